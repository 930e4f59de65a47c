"""Faults a test injects into the API server: RBAC denials, bursts of error statuses, broken exec
connections, and watch and log streams that are cut, go silent, expire or carry stray lines.

Faults of the node itself (image pulls, OOM kills, evictions, stuck finalizers) are the kubelet's
(kubelet.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import aiohttp.web

from .common import Call, Stream, error
from .store import Store


@dataclass
class Fault:
    """The next ``count`` requests that match (``verb`` and ``resource``, None for any) get ``status``."""

    count: int
    status: int
    verb: str | None
    resource: str | None


class Faults:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.faults: list[Fault] = []
        self.denied: set[tuple[str, str | None, str]] = set()  # (resource, subresource, verb)
        self.denied_in: set[tuple[str, str | None, str, str]] = set()  # (resource, subresource, verb, namespace)
        self.exec_faults: list[tuple[str, int]] = []  # ("stall", 0) or ("break", after_bytes), one per exec
        self.log_drop_after: int | None = None  # cut the next log stream after N lines (mid-line)
        self.streams: list[Stream] = []
        self.peak_watches = 0  # most watch streams open at the same time

    # --- requests ------------------------------------------------------------------------------------
    def fail(self, count: int, status: int = 500, verb: str | None = None, resource: str | None = None) -> None:
        self.faults.append(Fault(count, status, verb, resource))

    def deny(self, resource: str, verb: str, subresource: str | None = None, namespace: str | None = None) -> None:
        """RBAC refuses the verb (in one namespace, or everywhere)."""
        if namespace is None:
            self.denied.add((resource, subresource, verb))
        else:
            self.denied_in.add((resource, subresource, verb, namespace))

    def allows(self, resource: str, subresource: str | None, verb: str, namespace: str | None = None) -> bool:
        """What a SelfSubjectAccessReview answers: the same policy `refusal` applies to requests."""
        return (resource, subresource, verb) not in self.denied and \
            (resource, subresource, verb, namespace or "") not in self.denied_in

    def refusal(self, call: Call) -> aiohttp.web.Response | None:
        """The 403 RBAC answers, or an injected error status, for ``call``; None to serve it."""
        if (call.resource, call.subresource, call.verb) in self.denied or \
                (call.resource, call.subresource, call.verb, call.namespace or "") in self.denied_in:
            sub = f"/{call.subresource}" if call.subresource else ""
            group = f' in API group "{call.group}"' if call.group else ' in API group ""'
            return error(403, "Forbidden", f'{call.resource}{sub}{"." + call.group if call.group else ""} '
                         f'"{call.name or ""}" is forbidden: User "system:serviceaccount:keruta:keruta" cannot '
                         f'{call.verb} resource "{call.resource}{sub}"{group} in the namespace "{call.namespace}"')
        for fault in self.faults:
            if fault.count > 0 and (fault.verb in (None, call.verb)) and (fault.resource in (None, call.resource)):
                fault.count -= 1
                return error(fault.status, "InternalError", f"injected fault {fault.status}")
        return None

    # --- exec ----------------------------------------------------------------------------------------
    def stall_exec(self, count: int = 1) -> None:
        """The next ``count`` execs are upgraded (WebSocket or SPDY) and then send nothing at all."""
        self.exec_faults.extend([("stall", 0)] * count)

    def break_exec(self, after_bytes: int) -> None:
        """The next exec's connection breaks after ``after_bytes`` bytes of stdout (no status, no close)."""
        self.exec_faults.append(("break", after_bytes))

    def next_exec(self) -> tuple[str, int]:
        """The fault for the exec starting now: ("", 0) for none."""
        return self.exec_faults.pop(0) if self.exec_faults else ("", 0)

    # --- streams -------------------------------------------------------------------------------------
    def next_log_drop(self) -> int | None:
        """After how many lines the log stream starting now is cut (once), or None."""
        drop_after, self.log_drop_after = self.log_drop_after, None
        return drop_after

    @contextmanager
    def open_stream(self, kind: str) -> Iterator[Stream]:
        stream = Stream(kind)
        self.streams.append(stream)
        if kind == "watch":
            self.peak_watches = max(self.peak_watches, len(self.watches()))
        try:
            yield stream
        finally:
            self.streams.remove(stream)

    def watches(self) -> list[Stream]:
        return [s for s in self.streams if s.kind == "watch"]

    def inject_watch_lines(self, *lines: bytes) -> None:
        """Raw lines into every open watch stream, before its next event (e.g. b"\\n", a blank line)."""
        for stream in self.watches():
            stream.inject.extend(lines)
        self.store.call(self.store.notify())

    def expire_watches(self) -> None:
        """Compact the history (old resourceVersions now get 410) and send 410 to open watches."""
        self.store.compact()
        for stream in self.watches():
            stream.expire = True
        self.store.call(self.store.notify())

    def drop_watches(self) -> None:
        for stream in self.watches():
            stream.drop = True
        self.store.call(self.store.notify())

    def silence_watches(self) -> None:
        for stream in self.watches():
            stream.silent = True

    def drop_all(self) -> None:
        """Every open stream ends (the cluster stops)."""
        for stream in self.streams:
            stream.drop = True
