"""`pods/exec` over a real WebSocket, speaking the Kubernetes channel protocol (v5/v4.channel.k8s.io): the
command runs locally in the Pod's mapped volumes; stdout and stderr stream as channel 1 and 2 frames, and
the exit status comes on channel 3 before the close. Faults: a stalled exec, a connection broken mid-stream."""

from __future__ import annotations

import asyncio
import json

import aiohttp.web
import kmock

from . import containers
from .common import container_state, error, pod_container, raw_request
from .faults import Faults
from .kubelet import Kubelet
from .store import Store

STALL_SECONDS = 120  # how long a stalled exec holds its connection when the client never goes


class Exec:
    def __init__(self, store: Store, kubelet: Kubelet, faults: Faults) -> None:
        self.store = store
        self.kubelet = kubelet
        self.faults = faults
        self.commands: list[list[str]] = []  # every exec's command, as the client sent it

    async def serve(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        found = pod_container(self.store, request)
        if isinstance(found, aiohttp.web.Response):
            return found
        namespace, name, pod, container = found
        if "running" not in container_state(pod, container):
            return error(400, "BadRequest", f"container {container} is not valid for pod {name}: not running")
        raw = raw_request(request)
        command = raw.query.getall("command", [])
        spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
        volumes = containers.volume_paths(self.kubelet.root, namespace, name, pod["spec"])
        mounts = containers.mounts_of(spec, volumes)
        argv = containers.exec_argv(command, mounts)
        ws = aiohttp.web.WebSocketResponse(protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"))
        await ws.prepare(raw)
        self.commands.append(command)
        fault, limit = self.faults.next_exec()
        if fault == "stall":  # upgraded, then nothing at all until the client goes (or STALL_SECONDS)
            try:
                await asyncio.wait_for(ws.receive(), STALL_SECONDS)
            except TimeoutError:
                pass
            await ws.close()
            return ws
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            await ws.send_bytes(b"\x03" + json.dumps({"metadata": {}, "status": "Failure",
                                                       "message": f"exec failed: {exc}"}).encode())
            await ws.close()
            return ws

        sent = 0

        async def pump(stream: asyncio.StreamReader, channel: bytes) -> None:
            nonlocal sent
            while chunk := await stream.read(32 * 1024):
                if fault == "break" and channel == b"\x01":
                    chunk = chunk[:limit - sent]
                sent += len(chunk)
                if chunk:
                    await ws.send_bytes(channel + chunk)
                if fault == "break" and sent >= limit:
                    raise ConnectionAbortedError

        assert proc.stdout is not None and proc.stderr is not None
        try:
            await asyncio.gather(pump(proc.stdout, b"\x01"), pump(proc.stderr, b"\x02"))
        except ConnectionAbortedError:  # the connection breaks mid-stream: no status, no close frame
            proc.kill()
            await proc.wait()
            if raw.transport is not None:
                raw.transport.abort()
            return ws
        code = await proc.wait()
        status = {"metadata": {}, "status": "Success"} if code == 0 else {
            "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": f"command terminated with non-zero exit code: {code}",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
        await ws.send_bytes(b"\x03" + json.dumps(status).encode())
        await ws.close()
        return ws
