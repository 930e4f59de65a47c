"""The cluster's object store, on its own event loop: kmock keeps the objects; this adds what a real API
server adds to them, a resourceVersion on every write, a history of changes for watches (with compaction),
and a condition that every waiter (watches, log streams) wakes on."""

from __future__ import annotations

import asyncio
import bisect
import copy
import json
import threading
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import kmock

from .common import Event, now_iso

Listener = Callable[[kmock.resource, dict[str, Any], str], None]
Where = Callable[[dict[str, Any]], bool]
LabelKey = tuple[kmock.resource, str | None, str, str]  # (resource, namespace, label, value)


class Store:
    """Everything runs on one loop thread (``loop``); reads from other threads are carried to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="harness-cluster", daemon=True)
        self.emulator: kmock.KubernetesEmulator | None = None
        self.rv = 0
        self.history: list[Event] = []
        self.compacted_rv = 0
        self.changed: asyncio.Condition | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.listeners: list[Listener] = []  # told of every change but deletions (the Job controller)
        # Threads waiting for an object that carries a label (e.g. the Pod of a Job): looked at only when
        # an object with that label changes, so a thousand of them cost nothing on other changes.
        self.awaited: dict[LabelKey, list[tuple[Where, asyncio.Future[dict[str, Any]]]]] = {}

    # --- the loop ------------------------------------------------------------------------------------
    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run a coroutine on the cluster's loop from a test thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def cond(self) -> asyncio.Condition:
        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def notify(self) -> None:
        async with self.cond():
            self.cond().notify_all()

    async def wait_change(self, timeout: float, ready: Callable[[], bool] | None = None) -> None:
        """Until the store or a log changes, or ``timeout`` seconds. ``ready`` is checked under the lock
        first: a change made while the caller was busy (e.g. writing a response) is not missed."""
        async with self.cond():
            if ready is not None and ready():
                return
            try:
                await asyncio.wait_for(self.cond().wait(), timeout)
            except TimeoutError:
                pass

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a read of the store on the cluster's loop (the only thread that changes it)."""
        async def read() -> Any:
            return fn(*args)
        return self.call(read())

    # --- reads ---------------------------------------------------------------------------------------
    def _objects(self) -> Any:
        assert self.emulator is not None
        return self.emulator.objects

    def get(self, resource: kmock.resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        if threading.current_thread() is not self.thread:
            return self._on_loop(self.get, resource, namespace, name)
        key = (resource, namespace, name)
        obj = self._objects()[key] if key in self._objects() else None  # noqa: SIM401 (no .get on kmock's array)
        if obj is None or obj.deleted:
            return None
        return clone(obj.raw)

    def items(self, resource: kmock.resource, namespace: str | None = None,
              where: Where | None = None) -> list[dict[str, Any]]:
        """Copies of the objects of ``resource`` (in ``namespace``) for which ``where`` holds: it is asked
        before an object is copied (a selector costs no copies of what it leaves out)."""
        if threading.current_thread() is not self.thread:
            return self._on_loop(self.items, resource, namespace, where)
        out = []
        for (res, ns, _name), obj in self._objects().items():
            if res == resource and not obj.deleted and (namespace is None or ns == namespace) \
                    and (where is None or where(obj.raw)):
                out.append(clone(obj.raw))
        return out

    def labelled(self, resource: kmock.resource, namespace: str | None, label: str,
                 value: str) -> list[dict[str, Any]]:
        """The objects whose ``label`` is ``value`` (e.g. the Pods of a Job by its `job-name`)."""
        return self.items(resource, namespace, lambda raw: _label(raw, label) == value)

    def first_labelled(self, resource: kmock.resource, namespace: str | None, label: str, value: str,
                       where: Where, timeout: float) -> dict[str, Any] | None:
        """From a thread other than the loop's: the first object with ``label`` = ``value`` for which
        ``where`` holds, now or as soon as one is written; None after ``timeout`` seconds. Nothing polls:
        the wait is looked at only when an object with that label changes."""
        key = (resource, namespace, label, value)

        async def first() -> dict[str, Any] | None:
            for obj in self.labelled(resource, namespace, label, value):
                if where(obj):
                    return obj
            future: asyncio.Future[dict[str, Any]] = self.loop.create_future()
            entry = (where, future)
            self.awaited.setdefault(key, []).append(entry)
            try:
                return await asyncio.wait_for(future, timeout)
            except TimeoutError:
                return None
            finally:
                waiting = self.awaited.get(key, [])
                if entry in waiting:
                    waiting.remove(entry)
                if not waiting:
                    self.awaited.pop(key, None)

        return self.call(first(), timeout + 30)

    def _tell_awaited(self, resource: kmock.resource, namespace: str | None, snapshot: dict[str, Any]) -> None:
        labels = (snapshot.get("metadata") or {}).get("labels") or {}
        for label, value in labels.items():
            for where, future in list(self.awaited.get((resource, namespace, label, value), [])):
                if not future.done() and where(snapshot):
                    future.set_result(clone(snapshot))

    def history_after(self, rv: int) -> list[Event]:
        """The changes after resourceVersion ``rv``, oldest first (the history is in resourceVersion order)."""
        return self.history[bisect.bisect_right(self.history, rv, key=lambda event: event.rv):]

    # --- writes: every one gets a resourceVersion and a history entry --------------------------------
    async def commit(self, resource: kmock.resource, namespace: str | None, name: str, kind: str) -> None:
        self.rv += 1
        obj = self._objects()[(resource, namespace, name)]
        if kind == "DELETED":
            snapshot = clone(obj.history[-2].raw if len(obj.history) > 1 and obj.history[-2] else {})
            snapshot.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        else:
            obj.patch({"metadata": {"resourceVersion": str(self.rv)}})
            snapshot = clone(obj.raw)
        self.history.append(Event(self.rv, kind, resource.plural or "", namespace, snapshot))
        await self.notify()
        if kind != "DELETED":
            if self.awaited:
                self._tell_awaited(resource, namespace, snapshot)
            for listener in self.listeners:
                listener(resource, snapshot, kind)

    async def put(self, resource: kmock.resource, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now_iso())
        key = (resource, meta.get("namespace"), meta["name"])
        objects = self._objects()
        if key in objects and objects[key].deleted:
            objects[key].create(obj)
        else:
            objects[key] = obj
        await self.commit(resource, meta.get("namespace"), meta["name"], "ADDED")
        return self.get(resource, meta.get("namespace"), meta["name"]) or {}

    async def patch(self, resource: kmock.resource, namespace: str | None, name: str,
                    changes: dict[str, Any]) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        if key not in self._objects() or self._objects()[key].deleted:
            return None
        self._objects()[key].patch(changes)
        await self.commit(resource, namespace, name, "MODIFIED")
        return self.get(resource, namespace, name)

    async def replace(self, resource: kmock.resource, namespace: str | None, name: str,
                      obj: dict[str, Any]) -> None:
        """The object's new content, whole (PUT, or a patch the API server applied)."""
        self._objects()[(resource, namespace, name)].create(obj)
        await self.commit(resource, namespace, name, "MODIFIED")

    async def remove(self, resource: kmock.resource, namespace: str | None, name: str) -> None:
        key = (resource, namespace, name)
        if key in self._objects() and not self._objects()[key].deleted:
            self._objects()[key].delete()
            await self.commit(resource, namespace, name, "DELETED")

    def compact(self) -> None:
        """Forget the history so far: a watch or list from an older resourceVersion gets 410 Gone."""
        self.compacted_rv = self.rv


def clone(obj: Any) -> Any:
    """A copy of an object of the API (JSON: dicts, lists, strings, numbers), made through JSON: a few times
    faster than deepcopy, which a thousand Pods at once keep busy; anything else is deep-copied."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError):
        return copy.deepcopy(obj)


def _label(raw: dict[str, Any], label: str) -> Any:
    return ((raw.get("metadata") or {}).get("labels") or {}).get(label)
