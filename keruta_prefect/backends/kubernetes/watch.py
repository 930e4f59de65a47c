"""One watch of agent Pods per namespace, shared by every task waiting in the process.

The watch restarts itself: from the last resourceVersion after a server timeout or a dropped
connection, with a fresh list after 410 Gone, and after a read timeout when the stream went silent
(bookmarks keep a healthy stream talking). Waiting tasks subscribe by Job name and receive the Pods
of their Job; nothing polls.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import kubernetes.client
import kubernetes.watch
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from keruta_prefect.manifest import SELECTOR

log = logging.getLogger("keruta.kubernetes")

TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError, ValueError)


@dataclass
class WatchTuning:
    """Timeouts of the shared watch; tests shorten them."""

    server_timeout: int = 240  # the API server ends the watch after this; we resume from the last version
    read_timeout: float = 300  # no byte for this long (bookmarks included): the stream is dead, reconnect
    backoff: float = 0.5  # first pause after an error (doubles up to 10 s)
    idle_seconds: float = 30  # a watch nobody listens to stops after this


DEFAULT_TUNING = WatchTuning()


class Subscription:
    def __init__(self, watch: NamespaceWatch, job: str) -> None:
        self.watch = watch
        self.job = job
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def pods(self) -> list[dict[str, Any]]:
        return self.watch.pods_of(self.job)

    def settle(self, still: Any, timeout: float) -> None:
        """Wait (at most ``timeout``) while ``still()`` holds and Pod events keep coming: e.g. until the
        watch has delivered the status that explains why a log stream just ended."""
        self.watch.wait_while(still, timeout)

    def get(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.watch.unsubscribe(self)


class NamespaceWatch:
    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, tuning: WatchTuning) -> None:
        self.core = kubernetes.client.CoreV1Api(api)
        self.namespace = namespace
        self.tuning = tuning
        self._pods: dict[str, dict[str, Any]] = {}
        self._subscribers: dict[str, list[Subscription]] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # notified on every Pod event
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._idle_since: float | None = None
        self.thread = threading.Thread(target=self._run, name=f"keruta-watch-{namespace}", daemon=True)
        self.thread.start()

    # --- subscribers -------------------------------------------------------------------------------
    def subscribe(self, job: str, timeout: float = 30) -> Subscription:
        subscription = Subscription(self, job)
        with self._lock:
            self._subscribers.setdefault(job, []).append(subscription)
            self._idle_since = None
        self._synced.wait(timeout)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            subs = self._subscribers.get(subscription.job, [])
            if subscription in subs:
                subs.remove(subscription)
            if not subs:
                self._subscribers.pop(subscription.job, None)
            if not self._subscribers:
                self._idle_since = time.monotonic()

    def wait_while(self, still: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:  # `still` is checked under the (reentrant) lock: no event slips in between
            while still():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)  # a Pod event, or the deadline

    def pods_of(self, job: str) -> list[dict[str, Any]]:
        with self._lock:
            return [p for p in self._pods.values() if (p["metadata"].get("labels") or {}).get("job-name") == job]

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def _dispatch(self, kind: str, pod: dict[str, Any]) -> None:
        job = (pod["metadata"].get("labels") or {}).get("job-name")
        with self._lock:
            if kind == "DELETED":
                self._pods.pop(pod["metadata"]["name"], None)
            else:
                self._pods[pod["metadata"]["name"]] = pod
            subscribers = list(self._subscribers.get(job or "", []))
            self._changed.notify_all()
        for subscription in subscribers:
            subscription.events.put((kind, pod))

    # --- the watch loop ----------------------------------------------------------------------------
    def _relist(self) -> str:
        response = self.core.list_namespaced_pod(self.namespace, label_selector=SELECTOR, _preload_content=False,
                                                 _request_timeout=(10, 60))
        body = json.loads(response.data)
        current = {p["metadata"]["name"]: p for p in body.get("items") or []}
        with self._lock:
            gone = [p for name, p in self._pods.items() if name not in current]
        for pod in gone:
            self._dispatch("DELETED", pod)
        for pod in current.values():
            self._dispatch("MODIFIED", pod)
        self._synced.set()
        return str(body["metadata"]["resourceVersion"])

    def _idle(self) -> bool:
        with self._lock:
            return self._idle_since is not None and time.monotonic() - self._idle_since > self.tuning.idle_seconds

    def _run(self) -> None:
        version: str | None = None
        backoff = self.tuning.backoff
        while not self._stop.is_set() and not self._idle():
            try:
                if version is None:
                    version = self._relist()
                # deserialize stays on: the client's ERROR (410) handling needs it (with deserialize=False
                # it fails with KeyError 'raw_object' instead of raising ApiException(410)).
                stream = kubernetes.watch.Watch().stream(
                    self.core.list_namespaced_pod, self.namespace, label_selector=SELECTOR,
                    resource_version=version, allow_watch_bookmarks=True,
                    timeout_seconds=self.tuning.server_timeout,
                    _request_timeout=(10, self.tuning.read_timeout))
                for event in stream:
                    obj = event["raw_object"]
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if event["type"] != "BOOKMARK":
                        self._dispatch(event["type"], obj)
                    backoff = self.tuning.backoff
                    if self._stop.is_set():
                        return
                # The server ended the watch (its timeout): resume from where we are.
            except ApiException as exc:
                if exc.status == 410:
                    log.info("watch of Pods in %s expired (410); listing again", self.namespace)
                    version = None
                    continue
                log.warning("watch of Pods in %s failed: HTTP %s %s; retrying in %.1fs",
                            self.namespace, exc.status, exc.reason, backoff)
                if exc.status in (401, 403, 404):
                    version = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except TRANSPORT_ERRORS as exc:
                log.info("watch of Pods in %s dropped (%s); resuming", self.namespace, type(exc).__name__)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)


_watches: dict[tuple[int, str], NamespaceWatch] = {}
_watches_lock = threading.Lock()


def shared_watch(api: kubernetes.client.ApiClient, namespace: str, tuning: WatchTuning) -> NamespaceWatch:
    """The process's watch of agent Pods in ``namespace`` (started on first use)."""
    with _watches_lock:
        found = _watches.get((id(api), namespace))
        if found is None or not found.alive:
            found = NamespaceWatch(api, namespace, tuning)
            _watches[(id(api), namespace)] = found
        return found


def active_watches() -> list[NamespaceWatch]:
    with _watches_lock:
        return [w for w in _watches.values() if w.alive]


def stop_all() -> None:
    with _watches_lock:
        for watch in _watches.values():
            watch.stop()
        _watches.clear()

