"""list and watch as the API server answers them: label and field selectors (kmock ignores them), the
list's resourceVersion, watches from a resourceVersion (410 Gone before the compacted one), `timeoutSeconds`
and bookmarks, with the faults a test set on open watches."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp.web
import kmock

from . import tables
from .common import KINDS, raw_request, status_body
from .faults import Faults
from .selectors import field_matcher, label_matcher
from .store import Store


def matcher(request: kmock.Request) -> Callable[[str, str | None, dict[str, Any]], bool]:
    """Whether an object (of a resource, in a namespace) is one the list or watch ``request`` asks for."""
    labels = label_matcher(request.params.get("labelSelector"))
    fields = field_matcher(request.params.get("fieldSelector"))
    plural = request.resource.plural if request.resource else ""

    def match(resource: str, namespace: str | None, obj: dict[str, Any]) -> bool:
        return (resource == plural and (request.namespace is None or namespace == request.namespace)
                and labels((obj.get("metadata") or {}).get("labels") or {}) and fields(obj))
    return match


class ListWatch:
    def __init__(self, store: Store, faults: Faults) -> None:
        self.store = store
        self.faults = faults
        self.bookmark_interval = 1.0

    def list(self, request: kmock.Request) -> aiohttp.web.Response:
        assert request.resource is not None
        match = matcher(request)
        plural = request.resource.plural or ""
        items = self.store.items(request.resource, request.namespace,
                                 lambda obj: match(plural, obj.get("metadata", {}).get("namespace"), obj))
        group = request.resource.group
        version = tables.wants_table(request.headers.get("Accept", ""))
        if version is not None:
            return aiohttp.web.json_response(tables.table(plural, items, version, str(self.store.rv)))
        return aiohttp.web.json_response({
            "apiVersion": f"{group}/{request.resource.version}" if group else request.resource.version,
            "kind": KINDS.get(plural, "Object") + "List",
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": items,
        })

    async def watch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        store = self.store
        raw = raw_request(request)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        match = matcher(request)
        plural = request.resource.plural or ""
        since = request.params.get("resourceVersion") or ""
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        bookmarks = request.params.get("allowWatchBookmarks", "").lower() in ("true", "1")
        deadline = time.monotonic() + timeout if timeout else None

        table = tables.wants_table(request.headers.get("Accept", ""))
        first = True

        async def send(kind: str, obj: dict[str, Any]) -> None:
            nonlocal first
            if table is not None and kind in ("ADDED", "MODIFIED", "DELETED"):  # rows; definitions once
                obj = tables.table(plural, [obj], table, obj["metadata"].get("resourceVersion", ""), first)
                first = False
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if since not in ("", "0") and int(since) < store.compacted_rv:
            await send("ERROR", status_body(410, "Expired", f"too old resource version: {since} "
                                            f"({store.compacted_rv})"))
            return response
        if since in ("", "0"):
            last = store.rv
            for obj in store.items(request.resource, request.namespace,
                                   lambda obj: match(plural, obj.get("metadata", {}).get("namespace"), obj)):
                await send("ADDED", obj)
        else:
            last = int(since)
        with self.faults.open_stream("watch") as stream:
            try:
                last_bookmark = time.monotonic()
                while True:
                    if stream.drop:
                        if raw.transport is not None:
                            raw.transport.abort()
                        return response
                    if stream.expire:
                        await send("ERROR", status_body(410, "Expired", "too old resource version"))
                        return response
                    while stream.inject:
                        await response.write(stream.inject.pop(0))
                    pending = store.history_after(last) if not stream.silent else []
                    for event in pending:
                        last = event.rv
                        if match(event.resource, event.namespace, event.obj):
                            await send(event.type, event.obj)
                    if bookmarks and not stream.silent and \
                            time.monotonic() - last_bookmark > self.bookmark_interval:
                        await send("BOOKMARK", {"kind": KINDS.get(plural, "Object"), "apiVersion": "v1",
                                                "metadata": {"resourceVersion": str(last)}})
                        last_bookmark = time.monotonic()
                    wait = 0.5
                    if deadline is not None:
                        wait = min(wait, deadline - time.monotonic())
                        if wait <= 0:
                            return response
                    await store.wait_change(wait)
            except (ConnectionResetError, RuntimeError):
                return response
