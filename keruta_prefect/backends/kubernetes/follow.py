"""Following the agent's log into the Prefect run log and the store, while (and after) wait() runs.

A follower is started per Pod whose main container has started. It reads the Pod's end from the shared
watch (:class:`PodEnd`), hears the agent say it holds its files (``contract.READY_LOG_LINE``), keeps
the agent's own lines with the task, and may outlive ``wait()`` (the agent holds its container for
collection): :class:`Followers` keeps those, so ``cancel()`` can stop them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import kubernetes.client

from keruta_prefect import contract
from keruta_prefect.backends.base import LogSink, RunHandle
from keruta_prefect.backends.kubernetes.logs import AGENT_PREFIX, LogFollower, line_level
from keruta_prefect.backends.kubernetes.watch import Subscription, WatchTuning, subscribe
from keruta_prefect.store import LogLine

if TYPE_CHECKING:
    from keruta_prefect.backends.kubernetes.context import Kube

SETTLE_SECONDS = 1.0  # after a log stream ended: how long the watch may take to show the container's end
SOURCE_LENGTH = 64  # the store's limit for a log line's source ("pod/<name>")


def container_ended(pods: list[dict[str, Any]], pod: str) -> bool:
    """The main container of ``pod`` has terminated, or the Pod is gone."""
    for current in pods:
        if current["metadata"]["name"] == pod:
            for status in (current.get("status") or {}).get("containerStatuses") or []:
                if status.get("name") == "main" and "terminated" in (status.get("state") or {}):
                    return True
            return False
    return True


def parse_stamp(stamp: str) -> datetime | None:
    """An RFC 3339 timestamp of a log line (nanoseconds cut to microseconds); None if it is not one."""
    try:
        head, _, fraction = stamp.rstrip("Z").partition(".")
        return datetime.fromisoformat(f"{head}.{(fraction + '000000')[:6]}").replace(tzinfo=UTC)
    except ValueError:
        return None


class Followers:
    """The log followers that go on after ``wait()`` returned, by (namespace, Job)."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str], list[LogFollower]] = {}
        self._lock = threading.Lock()

    def keep(self, key: tuple[str, str], followers: list[LogFollower], deadline: float) -> None:
        """Keep those of ``followers`` still following, each ending at ``deadline`` at the latest."""
        with self._lock:
            for follower in followers:
                if not follower.ended.is_set():  # else on_end has run or waits for this lock: not kept
                    follower.expire_at(deadline)
                    self._kept.setdefault(key, []).append(follower)

    def forget(self, key: tuple[str, str], follower: LogFollower) -> None:
        with self._lock:
            kept = self._kept.get(key, [])
            if follower in kept:
                kept.remove(follower)
            if not kept:
                self._kept.pop(key, None)

    def stop(self, key: tuple[str, str]) -> None:
        with self._lock:
            kept = list(self._kept.get(key, []))
        for follower in kept:
            follower.stop()


class PodEnd:
    """Whether one Pod's main container has ended, from the shared watch; subscribed (without an event
    queue) for as long as its log is followed, and re-subscribed if that watch ends."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, tuning: WatchTuning, job: str,
                 pod: str) -> None:
        self.api, self.namespace, self.tuning, self.job, self.pod = api, namespace, tuning, job, pod
        self._lock = threading.Lock()
        self.subscription: Subscription | None = subscribe(api, namespace, tuning, job, listen=False)

    def _current(self) -> Subscription:
        with self._lock:
            if self.subscription is not None and self.subscription.watch.stopped:
                return self.subscription  # stopped on purpose (watch.stop_all): the follower is stopped too
            if self.subscription is None or not self.subscription.alive:
                if self.subscription is not None:
                    self.subscription.close()
                self.subscription = subscribe(self.api, self.namespace, self.tuning, self.job, listen=False)
            return self.subscription

    def ended(self) -> bool:
        return container_ended(self._current().pods(), self.pod)

    def settled(self) -> bool:
        """After the log stream ended: wait (at most SETTLE_SECONDS) for the watch to show the container's end."""
        subscription = self._current()
        subscription.settle(lambda: not container_ended(subscription.pods(), self.pod), SETTLE_SECONDS)
        return self.ended()

    def close(self) -> None:
        with self._lock:
            if self.subscription is not None:
                self.subscription.close()
                self.subscription = None


def follow(kube: Kube, handle: RunHandle, pod: str, wake: Callable[[], None], on_log: LogSink | None,
           holding: set[str]) -> LogFollower:
    """Start following the log of ``pod``: lines to ``on_log``, the agent's own lines to the store, and
    ``pod`` into ``holding`` (and ``wake()``) when the agent says it holds its files."""
    source = f"pod/{pod}"[:SOURCE_LENGTH]
    namespace = handle.namespace or ""
    # The follower's own view of the Pod: it may outlive wait() (the agent holds its files).
    end = PodEnd(kube.api, namespace, kube.tuning, handle.name, pod)

    def finished() -> bool:
        # The log stream ended cleanly: the container's end is usually on its way through the watch.
        # Wait for it (briefly) rather than reconnect to the log at once.
        return end.settled()

    def on_line(seq: int, stamp: str, text: str) -> None:
        if text.startswith(contract.READY_LOG_LINE):
            holding.add(pod)
            wake()  # the waiter decides now, not at its next timeout
        level = line_level(text)
        problem: Exception | None = None
        if on_log is not None:
            try:
                on_log(level, text)
            except Exception as exc:  # the store still gets the line; the follower logs the problem
                problem = exc
        if text.startswith(AGENT_PREFIX):
            # The agent's own words (its script's lines reach the store through the keruta API):
            # kept with the task, once, numbered by their place in this Pod's log.
            kube.store.add_logs(handle.task_id, source, [LogLine(seq=seq, level=level, message=text,
                                                                 ts=parse_stamp(stamp))])
        if problem is not None:
            raise problem

    def on_end(follower: LogFollower) -> None:
        end.close()
        wake()  # a waiter hears of it (a follower that stopped early changes its course)
        kube.followers.forget((namespace, handle.name), follower)

    return LogFollower(kube.api, namespace, pod, on_line, finished, read_timeout=kube.tuning.read_timeout,
                       on_end=on_end, clock=kube.tuning.clock).start()
