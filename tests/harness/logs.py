"""Containers' logs: the kubelet appends each line with its time stamp; ``pods/log`` serves them as text
(follow, timestamps, sinceTime with the API's one-second precision), as the API server proxies them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp.web
import kmock

from .common import container_state, error, log_timestamp, pod_container, raw_request
from .faults import Faults
from .store import Store


@dataclass
class ContainerLog:
    lines: list[tuple[str, str]] = field(default_factory=list)  # (timestamp, text)
    finished: bool = False
    # Who follows this log waits on it alone (not on every change of the cluster): a thousand followers
    # are woken by their own container's lines, not by everyone's.
    readers: set[asyncio.Future[None]] = field(default_factory=set)

    def wake(self) -> None:
        """On the cluster's loop: every follower of this log looks again."""
        for reader in self.readers:
            if not reader.done():
                reader.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until a line is added, the log ends, or ``timeout`` seconds."""
        reader: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.readers.add(reader)
        try:
            await asyncio.wait_for(reader, timeout)
        except TimeoutError:
            pass
        finally:
            self.readers.discard(reader)


class Logs:
    def __init__(self, store: Store, faults: Faults) -> None:
        self.store = store
        self.faults = faults
        self.logs: dict[tuple[str, str, str], ContainerLog] = {}  # (namespace, pod, container)

    def of(self, namespace: str, pod: str, container: str) -> ContainerLog:
        return self.logs.setdefault((namespace, pod, container), ContainerLog())

    async def append(self, namespace: str, pod: str, container: str, text: str) -> None:
        log = self.of(namespace, pod, container)
        log.lines.append((log_timestamp(), text))
        log.wake()

    def wake_all(self) -> None:
        """On the cluster's loop: every follower looks again (at the faults: the cluster stops)."""
        for log in self.logs.values():
            log.wake()

    def finish(self, namespace: str, pod: str, container: str) -> None:
        """The container's output has ended (a follower gets the rest, then the end of the stream); from
        any thread."""
        log = self.of(namespace, pod, container)
        log.finished = True
        self.store.loop.call_soon_threadsafe(log.wake)

    async def serve(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        found = pod_container(self.store, request)
        if isinstance(found, aiohttp.web.Response):
            return found
        namespace, name, pod, container = found
        state = container_state(pod, container)
        if "waiting" in state or not state:
            reason = (state.get("waiting") or {}).get("reason", "ContainerCreating")
            return error(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: {reason}')
        if request.params.get("previous", "").lower() in ("true", "1"):  # the harness restarts no container
            return error(400, "BadRequest", f'previous terminated container "{container}" in pod "{name}" not found')
        follow = request.params.get("follow", "").lower() in ("true", "1")
        stamps = request.params.get("timestamps", "").lower() in ("true", "1")
        since = request.params.get("sinceTime")
        if since:  # metav1.Time has one-second precision: the server answers from the start of that second
            since = since[:19]
        log = self.of(namespace, name, container)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/plain"})
        raw = raw_request(request)
        await response.prepare(raw)
        drop_after = self.faults.next_log_drop()
        sent = 0
        index = 0
        with self.faults.open_stream("log") as stream:
            try:
                while True:
                    while index < len(log.lines):
                        stamp, text = log.lines[index]
                        index += 1
                        if since and stamp[:19] < since:
                            continue
                        line = (f"{stamp} {text}\n" if stamps else f"{text}\n").encode()
                        if stream.drop or (drop_after is not None and sent >= drop_after):
                            await response.write(line[: max(1, len(line) // 2)])  # cut mid-line
                            if raw.transport is not None:
                                raw.transport.abort()
                            return response
                        await response.write(line)
                        sent += 1
                    if not follow or log.finished:
                        return response
                    if stream.drop:  # the cluster stops: a follower waiting for lines is cut too
                        if raw.transport is not None:
                            raw.transport.abort()
                        return response
                    await log.wait(0.5)  # a line, the end, or a look at the faults (a drop) every 0.5 s
            except (ConnectionResetError, RuntimeError):
                return response
