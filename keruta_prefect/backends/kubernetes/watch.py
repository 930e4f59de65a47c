"""One watch of agent Pods per namespace, shared by every task waiting in the process.

The watch restarts itself: from the last resourceVersion after a server timeout or a dropped
connection, with a fresh list after 410 Gone, and after a read timeout when the stream went silent
(bookmarks keep a healthy stream talking). Anything unexpected in the loop (a blank line the client
turns into ``None``, a malformed event, a bug) is logged with its traceback and the loop goes on after
a backoff. Waiting tasks subscribe by Job name and receive the Pods of their Job; nothing polls.

A watch that ends (stopped, idle, or its thread died) says so to every subscriber (a ``WATCH_ENDED``
event) and takes no new ones: :func:`subscribe` then starts a fresh watch, so a subscriber never
attaches to a watch that is on its way out.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kubernetes.client
import kubernetes.watch

from keruta_prefect.backends.base import TransientBackendError
from keruta_prefect.backends.kubernetes.api import (
    CONNECT_TIMEOUT,
    Forbidden,
    Gone,
    KubeError,
    NotFound,
    Unauthorized,
    Unreachable,
    request,
    translated,
)
from keruta_prefect.backoff import SYSTEM_CLOCK, Backoff, Clock
from keruta_prefect.manifest import SELECTOR

log = logging.getLogger("keruta.kubernetes")

SUBSCRIBE_TRIES = 3  # watches that end as soon as they start before subscribe() gives up (a broken watch)
WATCH_ENDED = "WATCH_ENDED"  # pseudo-event: the watch behind a subscription has ended
WAKE = "WAKE"  # pseudo-event: something other than the watch has news for the waiter (e.g. a log line)


@dataclass
class WatchTuning:
    """Timeouts of the shared watch and of what waits on it; tests shorten them."""

    server_timeout: int = 240  # the API server ends the watch after this; we resume from the last version
    read_timeout: float = 300  # no byte for this long (bookmarks included): the stream is dead, reconnect
    backoff: float = 0.5  # first pause after an error (doubles up to backoff_cap)
    backoff_cap: float = 10.0  # the longest pause between tries of a failing watch
    idle_seconds: float = 30  # a watch nobody listens to stops after this
    sync_timeout: float = 30  # subscribe() waits this long for the first list before it says so and goes on
    unsynced_limit: float = 120  # wait() gives up (TransientBackendError) when the watch cannot list for this long
    deadline_margin: float = 120  # wait() ends at the Job's activeDeadlineSeconds plus this, whatever happens
    wait_limit: float | None = None  # a fixed bound for wait() instead of the Job's deadline (tests)
    log_drain: float = 5  # after the outcome: at most this long for the rest of an ended container's log
    cancel_wait: float = 120  # cancel() waits this long for the Job's Pods to go, then says which are left
    exec_read_timeout: float = 60  # an exec that sends nothing for this long is stalled: the files are lost
    clock: Clock = field(default=SYSTEM_CLOCK, repr=False)  # what the backoff pauses and idle times are read on


DEFAULT_TUNING = WatchTuning()


class Subscription:
    def __init__(self, watch: NamespaceWatch, job: str, listen: bool = True) -> None:
        self.watch = watch
        self.job = job
        self.listen = listen  # False: only reads pods(); no event queue grows
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def pods(self) -> list[dict[str, Any]]:
        return self.watch.pods_of(self.job)

    @property
    def alive(self) -> bool:
        return self.watch.alive

    @property
    def synced(self) -> bool:
        return self.watch.synced

    def settle(self, still: Callable[[], bool], timeout: float) -> None:
        """Wait (at most ``timeout``) while ``still()`` holds and Pod events keep coming: e.g. until the
        watch has delivered the status that explains why a log stream just ended."""
        self.watch.wait_while(still, timeout)

    def wake(self) -> None:
        """Wake whoever waits in get() (it returns a WAKE event)."""
        self.events.put((WAKE, {}))

    def get(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.watch.unsubscribe(self)


class PodBook:
    """The Pods of one namespace as last seen, and who is subscribed to which Job's: the state a watch
    keeps, under one (reentrant) lock, with a condition notified on every Pod event."""

    def __init__(self, namespace: str, tuning: WatchTuning) -> None:
        self.namespace = namespace
        self.tuning = tuning
        self._pods: dict[str, dict[str, Any]] = {}
        # The same Pods by their Job (its `job-name` label): a waiter's look costs its own Pods, not all of them.
        self._by_job: dict[str, dict[str, dict[str, Any]]] = {}
        self._subscribers: dict[str, list[Subscription]] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # notified on every Pod event
        self._closing = False  # the watch has decided to end: no new subscribers
        self._idle_since: float | None = tuning.clock.now()

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    # --- subscribers ---------------------------------------------------------------------------------
    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            subs = self._subscribers.get(subscription.job, [])
            if subscription in subs:
                subs.remove(subscription)
            if not subs:
                self._subscribers.pop(subscription.job, None)
            if not self._subscribers:
                self._idle_since = self.tuning.clock.now()

    def wait_while(self, still: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:  # `still` is checked under the (reentrant) lock: no event slips in between
            while still() and self.alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)  # a Pod event, the watch's end, or the deadline

    def pods_of(self, job: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._by_job.get(job, {}).values())

    def _end(self) -> None:
        """No new subscribers; every subscriber hears that the watch ended."""
        with self._lock:
            self._closing = True
            subscribers = [s for subs in self._subscribers.values() for s in subs]
            self._changed.notify_all()
        for subscription in subscribers:
            subscription.events.put((WATCH_ENDED, {}))

    def _dispatch(self, kind: str, pod: dict[str, Any]) -> None:
        job = _job_of(pod)
        name = pod["metadata"]["name"]
        with self._lock:
            before = self._pods.get(name)
            if before is not None and (kind == "DELETED" or _job_of(before) != job):
                self._file(_job_of(before), name, None)
            if kind == "DELETED":
                self._pods.pop(name, None)
            else:  # (a Pod seen before keeps its place: pods_of() lists them in the order they came)
                self._pods[name] = pod
                self._file(job, name, pod)
            subscribers = [s for s in self._subscribers.get(job or "", []) if s.listen]
            self._changed.notify_all()
        for subscription in subscribers:
            subscription.events.put((kind, pod))

    def _file(self, job: str | None, name: str, pod: dict[str, Any] | None) -> None:
        """``pod`` under its Job in the index (None: out of it); under the lock."""
        if job is None:
            return
        pods = self._by_job.setdefault(job, {})
        if pod is not None:
            pods[name] = pod
            return
        pods.pop(name, None)
        if not pods:
            del self._by_job[job]


def _job_of(pod: dict[str, Any]) -> str | None:
    return (pod["metadata"].get("labels") or {}).get("job-name")


class NamespaceWatch(PodBook):
    """One watch of the keruta Pods of a namespace, shared by every waiter of this process: a thread lists
    them, then follows the watch from the last resourceVersion (listing again after a 410), and hands
    each event to the subscribers of its Job."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, tuning: WatchTuning) -> None:
        super().__init__(namespace, tuning)
        self.core = kubernetes.client.CoreV1Api(api)
        self._synced = threading.Event()
        self._stop = threading.Event()
        self.last_error: str | None = None  # the latest problem, for messages while unsynced
        self.failure: str | None = None  # why the thread ended, if not stopped or idle
        self.version: str | None = None  # the last resourceVersion seen (the watch resumes from it)
        self.thread = threading.Thread(target=self._main, name=f"keruta-watch-{namespace}", daemon=True)
        self.thread.start()

    def attach(self, job: str, listen: bool = True) -> Subscription | None:
        """A new subscription, or None when this watch is ending (ask :func:`subscribe` for a fresh one)."""
        with self._lock:
            if self._closing or self._stop.is_set() or not self.thread.is_alive():
                return None
            subscription = Subscription(self, job, listen)
            self._subscribers.setdefault(job, []).append(subscription)
            self._idle_since = None
            return subscription

    def subscribe(self, job: str, timeout: float | None = None) -> Subscription:
        """Subscribe to this very watch (prefer the module's :func:`subscribe`, which also replaces a
        watch that is ending)."""
        subscription = self.attach(job)
        if subscription is None:
            raise RuntimeError(f"the watch of Pods in namespace {self.namespace} has ended")
        self.wait_synced(self.tuning.sync_timeout if timeout is None else timeout)
        return subscription

    def wait_synced(self, timeout: float) -> bool:
        if self._synced.wait(timeout):
            return True
        log.warning("the watch of Pods in namespace %s has not listed them within %.0fs (%s); waiting on",
                    self.namespace, timeout, self.last_error or "no answer yet")
        return False

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._closing and not self._stop.is_set()

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    @property
    def stopped(self) -> bool:
        """Stopped on purpose (stop(), stop_all()), not ended by idleness or a failure."""
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self._end()

    # --- the watch loop ----------------------------------------------------------------------------
    def _relist(self) -> str:
        body = request(self.core.list_namespaced_pod, self.namespace, label_selector=SELECTOR,
                       what=f"list Pods in namespace {self.namespace}")
        current = {p["metadata"]["name"]: p for p in body.get("items") or []}
        with self._lock:
            gone = [p for name, p in self._pods.items() if name not in current]
        for pod in gone:
            self._dispatch("DELETED", pod)
        for pod in current.values():
            self._dispatch("MODIFIED", pod)
        self._synced.set()
        self.last_error = None
        return str(body["metadata"]["resourceVersion"])

    def _should_end(self) -> bool:
        """Stopped, or idle for long enough; decided under the lock so that no subscriber slips in."""
        with self._lock:
            idle = (self._idle_since is not None
                    and self.tuning.clock.now() - self._idle_since > self.tuning.idle_seconds)
            if self._stop.is_set() or idle:
                self._closing = True
                return True
            return False

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # never silently: the subscribers hear of it below
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("the watch of Pods in namespace %s ended unexpectedly", self.namespace, exc_info=True)
        finally:
            self._end()

    def _run(self) -> None:
        self.version = None  # where to resume from; None: list first
        backoff = Backoff(self.tuning.backoff, self.tuning.backoff_cap)
        while not self._should_end():
            try:
                with translated(f"watch Pods in namespace {self.namespace}"):
                    if self.version is None:
                        self.version = self._relist()
                    if self._follow(self.version, backoff):
                        return
                continue  # the server ended the watch (its timeout): resume from where we are
            except Gone:
                log.info("watch of Pods in %s expired (410); listing again", self.namespace)
                self.version = None
                continue
            except Unreachable as exc:
                self._dropped(exc.kind)
            except KubeError as exc:
                self.last_error = f"HTTP {exc.status} {exc.reason}".strip()
                log.warning("watch of Pods in %s failed: HTTP %s %s; retrying in %.1fs",
                            self.namespace, exc.status, exc.reason, backoff.current)
                if isinstance(exc, Unauthorized | Forbidden | NotFound):
                    self.version = None
            except ValueError as exc:  # a line the client could not read: the stream is broken, resume
                self._dropped(type(exc).__name__)
            except Exception as exc:  # a bug or something the client did not expect: say so, go on
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("watch of Pods in %s hit an unexpected error; listing again in %.1fs",
                            self.namespace, backoff.current, exc_info=True)
                self.version = None
            backoff.pause(self.tuning.clock, self._stop)  # after a failure only

    def _follow(self, version: str, backoff: Backoff) -> bool:
        """Dispatch the events of one watch request from ``version`` (``self.version`` follows them); True
        when the watch is to end, False when the server ended the request."""
        # deserialize stays on: the client's ERROR (410) handling needs it (with deserialize=False
        # it fails with KeyError 'raw_object' instead of raising ApiException(410)).
        stream = kubernetes.watch.Watch().stream(
            self.core.list_namespaced_pod, self.namespace, label_selector=SELECTOR,
            resource_version=version, allow_watch_bookmarks=True,
            timeout_seconds=self.tuning.server_timeout,
            _request_timeout=(CONNECT_TIMEOUT, self.tuning.read_timeout))
        for event in stream:
            if not isinstance(event, dict) or not isinstance(event.get("raw_object"), dict):
                continue  # a blank line (the client yields None) or something that is no event
            obj = event["raw_object"]
            self.version = str((obj.get("metadata") or {}).get("resourceVersion") or self.version)
            if event.get("type") != "BOOKMARK":
                self._dispatch(str(event.get("type")), obj)
            self.last_error = None
            backoff.reset()
            if self._should_end():
                return True
        return False

    def _dropped(self, kind: str) -> None:
        self.last_error = f"connection: {kind}"
        log.info("watch of Pods in %s dropped (%s); resuming", self.namespace, kind)


_watches: dict[tuple[int, str], NamespaceWatch] = {}
_watches_lock = threading.Lock()


def shared_watch(api: kubernetes.client.ApiClient, namespace: str, tuning: WatchTuning) -> NamespaceWatch:
    """The process's watch of agent Pods in ``namespace`` (started on first use, restarted when it ended)."""
    with _watches_lock:
        found = _watches.get((id(api), namespace))
        if found is None or not found.alive:
            found = NamespaceWatch(api, namespace, tuning)
            _watches[(id(api), namespace)] = found
        return found


def subscribe(api: kubernetes.client.ApiClient, namespace: str, tuning: WatchTuning, job: str, *,
              listen: bool = True, timeout: float | None = None) -> Subscription:
    """A subscription to the Pods of ``job`` on a live watch, after its first list (or after
    ``tuning.sync_timeout``, with a warning; ``Subscription.synced`` tells)."""
    for _ in range(SUBSCRIBE_TRIES):
        watch = shared_watch(api, namespace, tuning)
        subscription = watch.attach(job, listen)
        if subscription is not None:  # else the watch was ending just now: shared_watch starts a fresh one
            watch.wait_synced(tuning.sync_timeout if timeout is None else timeout)
            return subscription
    raise TransientBackendError(f"the watch of Pods in namespace {namespace} ends as soon as it starts "
                                f"({watch.failure or 'stopped'})")


def active_watches() -> list[NamespaceWatch]:
    with _watches_lock:
        return [w for w in _watches.values() if w.alive]


def stop_all() -> None:
    """Stop every watch of this process, and the log followers that read their Pods' ends from them
    (the process is done with this cluster: tests, benchmarks)."""
    from keruta_prefect.backends.kubernetes import logs

    logs.stop_all()
    with _watches_lock:
        for watch in _watches.values():
            watch.stop()
        _watches.clear()
