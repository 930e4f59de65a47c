"""wait(): until an attempt's outcome is known, from its Pods (the shared watch), the agent's own
report when it holds its files for collection, or the Job when the Pods cannot tell.

One :class:`Waiter` per call holds the state (the subscription, the followers, what was said); each
event (or poll) is one :meth:`Waiter.step`. :func:`diagnose` decides; this module only gathers the
facts and acts on the verdict.
"""

from __future__ import annotations

import logging
from typing import Any

from keruta_prefect import contract
from keruta_prefect.backends.base import LogSink, Outcome, RunHandle, TransientBackendError, agent_report
from keruta_prefect.backends.kubernetes.api import KubeError
from keruta_prefect.backends.kubernetes.context import Kube
from keruta_prefect.backends.kubernetes.diagnose import Verdict, diagnose, waiting_keys
from keruta_prefect.backends.kubernetes.follow import container_ended, follow
from keruta_prefect.backends.kubernetes.jobs import delete_job, read_job
from keruta_prefect.backends.kubernetes.logs import LogFollower
from keruta_prefect.backends.kubernetes.watch import WATCH_ENDED, subscribe
from keruta_prefect.manifest import build_job
from keruta_prefect.models import RunContext, Task, TaskStatus
from keruta_prefect.outcomes import AgentExit, AgentReport, outcome_of

log = logging.getLogger("keruta.kubernetes")

POLL_INTERVAL = 0.5  # seconds between looks when no event comes (timers: grace periods, the bound)
NO_POD_JOB_READ = 10.0  # no Pod seen for this long: read the Job (it may have failed before making one)…
NO_POD_JOB_READ_CAP = 60.0  # …and again after twice as long each time, up to this: a thousand Jobs queued at
# a controller that makes their Pods slowly cost a handful of reads each, not one every 10 s


def no_pod_read_due(since_last_read: float, reads: int) -> bool:
    """No Pod yet: is it time to read the Job again, ``since_last_read`` seconds after the last read (or the
    start), ``reads`` reads without a Pod so far? After 10 s, then 20, 40, then every 60 s."""
    return since_last_read > min(NO_POD_JOB_READ * 2.0 ** min(reads, 8), NO_POD_JOB_READ_CAP)


def wait_limit(kube: Kube, handle: RunHandle) -> float:
    """The Job's activeDeadlineSeconds (as built for this task) plus the margin."""
    if kube.tuning.wait_limit is not None:
        return kube.tuning.wait_limit
    try:
        task = kube.store.get_task(handle.task_id)
    except LookupError:
        task = Task(id=handle.task_id or "unknown")
    ctx = RunContext(attempt=handle.attempt, timeout_seconds=handle.timeout_seconds)  # a retry may give it longer
    deadline = build_job(task, kube.settings, ctx)["spec"]["activeDeadlineSeconds"]
    return float(deadline) + kube.tuning.deadline_margin


def settled(verdict: Verdict, report: AgentReport | None) -> Outcome | None:
    """A verdict's outcome: when the agent ended, its exit facts *and its own report* decide (every path,
    the deadline's included); otherwise what Kubernetes said."""
    if verdict.exit is not None:
        return outcome_of(verdict.exit, report)
    return verdict.outcome


def past_limit(kube: Kube, handle: RunHandle, pods: list[dict[str, Any]], limit: float) -> Outcome:
    """wait()'s bound has passed: the Job's word if it has one; else the Job goes and the attempt fails."""
    job, missing = read_job(kube, handle)
    verdict = diagnose(pods, job, waited={}, image_pull_grace=float("inf"), unschedulable_grace=float("inf"),
                       job_known_missing=missing)
    decided = settled(verdict, agent_report(kube.store, handle.task_id))
    if decided is not None:
        return decided
    message = (f"no end of Job {handle.name} was seen within {limit:.0f}s (its activeDeadlineSeconds plus a "
               "margin); the Job was deleted")
    try:
        delete_job(kube, handle, "Background", what="delete Job")
    except KubeError as exc:
        message = f"no end of Job {handle.name} was seen within {limit:.0f}s; deleting it failed: {exc}"
    log.warning("%s", message)
    return Outcome(status=TaskStatus.FAILED, reason=contract.Reason.WAIT_DEADLINE, message=message)


def reported_outcome(kube: Kube, handle: RunHandle) -> Outcome:
    """The agent holds its container (its exit status cannot be seen yet): its report decides."""
    return outcome_of(AgentExit(code=None), agent_report(kube.store, handle.task_id))


def reported_final(kube: Kube, handle: RunHandle) -> bool:
    try:
        return kube.store.get_task(handle.task_id).status.terminal
    except LookupError:
        return False


class Waiter:
    """The state of one wait() (see :meth:`KubernetesBackend.wait`)."""

    def __init__(self, kube: Kube, handle: RunHandle, on_log: LogSink | None) -> None:
        assert handle.namespace is not None
        self.kube, self.handle, self.on_log = kube, handle, on_log
        self.namespace = handle.namespace
        self.clock = kube.tuning.clock
        self.started = self.clock.now()
        self.limit = wait_limit(kube, handle)
        self.subscription = subscribe(kube.api, self.namespace, kube.tuning, handle.name)
        self.unsynced_since: float | None = None
        self.seen_waiting: dict[str, float] = {}  # waiting containers (by diagnose's key): since when
        self.followers: dict[str, LogFollower] = {}
        self.holding: set[str] = set()  # pods whose agent has reported and holds its files for collection
        self.said: set[str] = set()
        self.job: dict[str, Any] | None = None
        self.job_missing = False
        self.last_job_read = self.started
        self.no_pod_reads = 0  # Job reads while no Pod was seen (each waits twice as long as the last)

    def run(self) -> Outcome:
        handed_off = False
        try:
            # The first look is at once: the Pod may have changed before this subscription existed (a
            # fast start, a reattach), and then no event would come to end the first wait.
            event = self.subscription.get(timeout=0.0)
            while True:
                outcome = self.step(event)
                if outcome is not None:
                    handed_off = True
                    return outcome
                event = self.subscription.get(timeout=POLL_INTERVAL)
        finally:
            self.subscription.close()
            if not handed_off:
                for follower in self.followers.values():
                    follower.stop()

    def step(self, event: tuple[str, dict[str, Any]] | None) -> Outcome | None:
        """One look after ``event`` (None: the poll interval passed); the outcome when it is known."""
        now = self.clock.now()
        self._renew(event)
        if not self._synced(now):
            return None
        pods = self.subscription.pods()
        verdict = self._verdict(pods, event, now)
        for note in verdict.notes:
            self.say(note)
        for pod in verdict.started:
            if pod not in self.followers:
                self.followers[pod] = follow(self.kube, self.handle, pod, self.wake, self.on_log, self.holding)
        unfollowed = [f for f in self.followers.values() if f.error and not container_ended(pods, f.pod)]
        for follower in unfollowed:
            self.say(f"the log of Pod {follower.pod} cannot be followed ({follower.error}); "
                     "the agent's report to the keruta API decides")
        if verdict.outcome is None and (self.holding or (unfollowed and reported_final(self.kube, self.handle))):
            # The agent finished and keeps its container for collection: its own report is the outcome.
            verdict.outcome = reported_outcome(self.kube, self.handle)
        if verdict.outcome is None and now - self.started >= self.limit:
            verdict.outcome = past_limit(self.kube, self.handle, pods, self.limit)
        if verdict.outcome is None:
            return None
        self._let_go(pods)
        return settled(verdict, agent_report(self.kube.store, self.handle.task_id))

    def wake(self) -> None:
        """Wake the waiter (a follower has news): it looks now, not at its next poll."""
        self.subscription.wake()

    def say(self, note: str) -> None:
        """Tell the user (log and run log) once."""
        if note in self.said:
            return
        self.said.add(note)
        log.warning("%s", note)
        if self.on_log is not None:
            try:
                self.on_log("WARN", note)
            except Exception:
                log.warning("a note for the run log could not be passed on", exc_info=True)

    def _renew(self, event: tuple[str, dict[str, Any]] | None) -> None:
        """A watch that ended is replaced (its subscribers hear WATCH_ENDED)."""
        if self.subscription.alive and (event is None or event[0] != WATCH_ENDED):
            return
        reason = self.subscription.watch.failure or "stopped"
        log.warning("the watch of Pods in namespace %s ended (%s); watching again", self.namespace, reason)
        self.subscription.close()
        self.subscription = subscribe(self.kube.api, self.namespace, self.kube.tuning, self.handle.name)

    def _synced(self, now: float) -> bool:
        """Has the watch listed the Pods? TransientBackendError when it has not for ``unsynced_limit``."""
        if self.subscription.synced:
            self.unsynced_since = None
            return True
        self.unsynced_since = self.unsynced_since or now
        if now - self.unsynced_since >= self.kube.tuning.unsynced_limit:
            raise TransientBackendError(
                f"the watch of Pods in namespace {self.namespace} has not listed them for "
                f"{now - self.unsynced_since:.0f}s ({self.subscription.watch.last_error or 'no answer'}); "
                f"Job {self.handle.name} is left as it is")
        return False

    def _verdict(self, pods: list[dict[str, Any]], event: tuple[str, dict[str, Any]] | None, now: float) -> Verdict:
        """diagnose() on the Pods; again with the Job when the Pods cannot tell (or are gone, or none came)."""
        keys = waiting_keys(pods)
        for key in keys:
            self.seen_waiting.setdefault(key, now)
        waited = {key: now - since for key, since in self.seen_waiting.items() if key in keys}
        grace = float(self.kube.settings.image_pull_grace_seconds)
        unschedulable = self.kube.settings.crash_loop_back_off_timeout_ms / 1000
        verdict = diagnose(pods, self.job, waited=waited, image_pull_grace=grace, unschedulable_grace=unschedulable)
        pod_gone = event is not None and event[0] == "DELETED" and not pods
        no_pod_yet = not pods and no_pod_read_due(now - self.last_job_read, self.no_pod_reads)
        if verdict.outcome is None and (verdict.need_job or pod_gone or no_pod_yet):
            self.job, self.job_missing = read_job(self.kube, self.handle)
            self.last_job_read = now
            self.no_pod_reads = self.no_pod_reads + 1 if not pods else 0
            verdict = diagnose(pods, self.job, waited=waited, image_pull_grace=grace,
                               unschedulable_grace=unschedulable, job_known_missing=self.job_missing)
        return verdict

    def _let_go(self, pods: list[dict[str, Any]]) -> None:
        """The outcome is known. Followers of ended containers deliver the rest of the log first (briefly);
        those of containers still running (holding their files) go on by themselves, up to a bound."""
        ended = [f for f in self.followers.values() if container_ended(pods, f.pod)]
        for follower in ended:
            follower.wake()
        until = self.clock.now() + self.kube.tuning.log_drain
        for follower in ended:
            follower.join(max(0.0, until - self.clock.now()))
        bound = self.clock.now() + self.kube.settings.artifacts_hold_timeout + self.kube.tuning.deadline_margin
        self.kube.followers.keep((self.namespace, self.handle.name), list(self.followers.values()), bound)
