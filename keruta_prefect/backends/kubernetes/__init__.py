"""The Kubernetes backend: each attempt of a keruta task is an agent Job.

launch: create the task tree's PVC (if any) and the Job; a Job of the same task attempt that already
exists is reattached to, anything else named alike is an error. wait: the shared namespace watch feeds
the Pods of the Job to `diagnose`; started Pods' logs are followed into the Prefect run log; the Job is
read only when the Pods cannot tell; wait is bounded by the Job's own deadline. collect (exec mode):
tar over exec, then release the holding agent; never raises. cancel: Foreground deletion, then wait
(bounded) until the Pods are gone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from keruta_prefect import contract
from keruta_prefect.artifacts import ArchiveRejected, CollectResult
from keruta_prefect.backends.base import (
    BackendError,
    LogSink,
    Outcome,
    RunContext,
    RunHandle,
    TransientBackendError,
    agent_report,
)
from keruta_prefect.backends.kubernetes.client import api_client, api_detail
from keruta_prefect.backends.kubernetes.diagnose import diagnose, waiting_keys
from keruta_prefect.backends.kubernetes.exec import ArtifactsLost, ContainerGone, collect_directory, release
from keruta_prefect.backends.kubernetes.logs import AGENT_PREFIX, LogFollower, line_level
from keruta_prefect.backends.kubernetes.watch import DEFAULT_TUNING, WATCH_ENDED, Subscription, WatchTuning, subscribe
from keruta_prefect.manifest import (
    ANNOTATION_TASK,
    LABEL_ATTEMPT,
    LABEL_FLOW_RUN,
    LABEL_TASK,
    SELECTOR,
    build_job,
    build_pvc,
    label_value,
    namespace_of,
    pvc_name,
)
from keruta_prefect.models import Task, TaskStatus
from keruta_prefect.outcomes import AgentExit, outcome_of
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import LogLine, Store

log = logging.getLogger("keruta.kubernetes")
TRANSIENT = {0, 408, 429, 500, 502, 503, 504}
TRANSPORT = (urllib3.exceptions.HTTPError, OSError)
# Every plain request: the raw answer (parsed as JSON here), and (connect, read) timeouts: none waits forever.
PLAIN: dict[str, Any] = {"_preload_content": False, "_request_timeout": (10, 60)}



def unreachable(exc: Exception, what: str) -> TransientBackendError:
    """A request that got no answer (refused, reset, timed out): worth a retry."""
    return TransientBackendError(f"{what}: no answer from the API server ({type(exc).__name__}: {exc})")


def api_error(exc: ApiException, what: str) -> Exception:
    """An ApiException as a retryable or a permanent error with one line for a person."""
    detail = api_detail(exc)
    if exc.status in TRANSIENT:
        return TransientBackendError(f"{what}: HTTP {exc.status}: {detail}")
    if exc.status == 403:
        return BackendError(f"{what}: forbidden: {detail} — grant the Role in deployments/rbac.yaml to the account "
                            "keruta-prefect runs as (keruta-prefect doctor checks every verb)")
    if exc.status == 404 and "namespaces" in detail:
        return BackendError(f"{what}: {detail} — create the namespace or set keruta.kubernetes.default-namespace")
    return BackendError(f"{what}: HTTP {exc.status}: {detail}")


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, settings: KerutaSettings, store: Store, *, tuning: WatchTuning | None = None) -> None:
        self.settings = settings
        self.store = store
        self.api = api_client(settings)  # BackendError when disabled or unconfigured
        self.batch = kubernetes.client.BatchV1Api(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.tuning = tuning or DEFAULT_TUNING
        # Log followers that go on after wait() returned (the agent holds its files), by (namespace, Job).
        self._followers: dict[tuple[str, str], list[LogFollower]] = {}
        self._lock = threading.Lock()

    # --- launch ------------------------------------------------------------------------------------
    def launch(self, task: Task, ctx: RunContext) -> RunHandle:
        namespace = namespace_of(task, self.settings)
        pvc = build_pvc(task, self.settings, ctx)
        if pvc is not None:
            self._ensure_pvc(namespace, pvc)
        job = build_job(task, self.settings, ctx)
        name = job["metadata"]["name"]
        try:
            response = self.batch.create_namespaced_job(namespace, job, **PLAIN)
            created = json.loads(response.data)
        except ApiException as exc:
            if exc.status != 409:
                raise api_error(exc, f"create Job {name} in namespace {namespace}") from None
            created = self._existing(namespace, name, task, ctx)
        except TRANSPORT as exc:  # it may have been created: the retry finds it (409) and reattaches
            raise unreachable(exc, f"create Job {name} in namespace {namespace}") from None
        return RunHandle(backend=self.name, task_id=task.id, attempt=ctx.attempt, flow_run_id=ctx.flow_run_id,
                         name=name, namespace=namespace, uid=created["metadata"].get("uid"))

    def _existing(self, namespace: str, name: str, task: Task, ctx: RunContext) -> dict[str, Any]:
        """The Job already there: this very attempt (reattach), or a clear error."""
        try:
            existing = json.loads(self.batch.read_namespaced_job(name, namespace, **PLAIN).data)
        except ApiException as exc:
            raise api_error(exc, f"read Job {name} in namespace {namespace}") from None
        except TRANSPORT as exc:
            raise unreachable(exc, f"read Job {name} in namespace {namespace}") from None
        labels = existing["metadata"].get("labels") or {}
        if labels.get(LABEL_TASK) == label_value(task.id) and labels.get(LABEL_ATTEMPT) == str(ctx.attempt):
            log.info("Job %s/%s of this task attempt exists already; reattaching", namespace, name)
            return existing
        raise BackendError(f"a Job named {name} already exists in namespace {namespace} and is not attempt "
                           f"{ctx.attempt} of task {task.id}; delete it or rename the task")

    def _ensure_pvc(self, namespace: str, pvc: dict[str, Any]) -> None:
        name = pvc["metadata"]["name"]
        try:
            self.core.create_namespaced_persistent_volume_claim(namespace, pvc, **PLAIN)
        except ApiException as exc:
            if exc.status != 409:
                raise api_error(exc, f"create PersistentVolumeClaim {name} in namespace {namespace}") from None
            # Already there: the task tree's volume, created by an earlier task of the tree.
        except TRANSPORT as exc:
            raise unreachable(exc, f"create PersistentVolumeClaim {name} in namespace {namespace}") from None

    def release_volume(self, task: Task, root_task_id: str) -> str | None:
        """Delete the PersistentVolumeClaim the task tree shares (absent already is fine); its name."""
        namespace, name = namespace_of(task, self.settings), pvc_name(root_task_id)
        try:
            self.core.delete_namespaced_persistent_volume_claim(name, namespace, **PLAIN)
        except ApiException as exc:
            if exc.status != 404:
                raise api_error(exc, f"delete PersistentVolumeClaim {name}") from None
        except TRANSPORT as exc:
            raise unreachable(exc, f"delete PersistentVolumeClaim {name}") from None
        return name

    # --- wait --------------------------------------------------------------------------------------
    def wait(self, handle: RunHandle, on_log: LogSink | None = None) -> Outcome:
        """Until the attempt's outcome is known: from its Pods (the shared watch), the agent's own report
        when it holds its files for collection, or the Job when the Pods cannot tell.

        Bounded: at the Job's activeDeadlineSeconds plus a margin (``tuning.deadline_margin``) the Job is
        read one last time, and if it still cannot tell, it is deleted and the outcome is FAILED
        (WAIT_DEADLINE). A watch that cannot list the Pods for ``tuning.unsynced_limit`` seconds raises
        TransientBackendError (the flow retries wait). Log followers of containers that keep running
        (the agent holds its files) go on after the return, on their own, until the container ends."""
        assert handle.namespace is not None
        namespace = handle.namespace
        started = time.monotonic()
        limit = self._wait_limit(handle)
        subscription = subscribe(self.api, namespace, self.tuning, handle.name)
        current = [subscription]  # the waiter's subscription, for followers to wake it
        unsynced_since: float | None = None
        seen_waiting: dict[str, float] = {}
        followers: dict[str, LogFollower] = {}
        holding: set[str] = set()  # pods whose agent has reported and holds its files for collection
        said: set[str] = set()
        job: dict[str, Any] | None = None
        job_missing = False
        last_job_read = time.monotonic()
        handed_off = False

        def say(note: str) -> None:
            if note not in said:
                said.add(note)
                log.warning("%s", note)
                if on_log is not None:
                    try:
                        on_log("WARN", note)
                    except Exception:
                        log.warning("a note for the run log could not be passed on", exc_info=True)

        first = True
        try:
            while True:
                # The first look is at once: the Pod may have changed before this subscription existed (a
                # fast start, a reattach), and then no event would come to end the first 0.5 s wait.
                event = subscription.get(timeout=0.0 if first else 0.5)
                first = False
                now = time.monotonic()
                if not subscription.alive or (event is not None and event[0] == WATCH_ENDED):
                    reason = subscription.watch.failure or "stopped"
                    log.warning("the watch of Pods in namespace %s ended (%s); watching again", namespace, reason)
                    subscription.close()
                    subscription = subscribe(self.api, namespace, self.tuning, handle.name)
                    current[0] = subscription
                if not subscription.synced:
                    unsynced_since = unsynced_since or now
                    if now - unsynced_since >= self.tuning.unsynced_limit:
                        raise TransientBackendError(
                            f"the watch of Pods in namespace {namespace} has not listed them for "
                            f"{now - unsynced_since:.0f}s ({subscription.watch.last_error or 'no answer'}); "
                            f"Job {handle.name} is left as it is")
                    continue
                unsynced_since = None
                pods = subscription.pods()
                keys = waiting_keys(pods)
                for key in keys:
                    seen_waiting.setdefault(key, now)
                waited = {key: now - since for key, since in seen_waiting.items() if key in keys}
                grace = float(self.settings.image_pull_grace_seconds)
                unschedulable = self.settings.crash_loop_back_off_timeout_ms / 1000
                verdict = diagnose(pods, job, waited=waited, image_pull_grace=grace, unschedulable_grace=unschedulable)
                pod_gone = event is not None and event[0] == "DELETED" and not pods
                no_pod_yet = not pods and now - last_job_read > 10
                if verdict.outcome is None and (verdict.need_job or pod_gone or no_pod_yet):
                    job, job_missing = self._read_job(handle)
                    last_job_read = now
                    verdict = diagnose(pods, job, waited=waited, image_pull_grace=grace,
                                       unschedulable_grace=unschedulable, job_known_missing=job_missing)
                for note in verdict.notes:
                    say(note)
                for pod in verdict.started:
                    if pod not in followers:
                        followers[pod] = self._follow(handle, pod, lambda: current[0].wake(), on_log, holding)
                unfollowed = [f for f in followers.values() if f.error and not _container_ended(pods, f.pod)]
                for follower in unfollowed:
                    say(f"the log of Pod {follower.pod} cannot be followed ({follower.error}); "
                        "the agent's report to the keruta API decides")
                if verdict.outcome is None and (holding or (unfollowed and self._reported_final(handle))):
                    # The agent finished and keeps its container for collection: its own report is the outcome.
                    verdict.outcome = self._reported_outcome(handle)
                if verdict.outcome is None and now - started >= limit:
                    verdict.outcome = self._past_limit(handle, pods, limit)
                if verdict.outcome is not None:
                    self._let_go(handle, followers, pods)
                    handed_off = True
                    if verdict.exit is not None:  # the agent ended: its exit facts and its own report decide
                        return outcome_of(verdict.exit, agent_report(self.store, handle.task_id))
                    return verdict.outcome
        finally:
            subscription.close()
            if not handed_off:
                for follower in followers.values():
                    follower.stop()

    def _wait_limit(self, handle: RunHandle) -> float:
        """The Job's activeDeadlineSeconds (as built for this task) plus the margin."""
        if self.tuning.wait_limit is not None:
            return self.tuning.wait_limit
        try:
            task = self.store.get_task(handle.task_id)
        except LookupError:
            task = Task(id=handle.task_id or "unknown")
        deadline = build_job(task, self.settings, RunContext(attempt=handle.attempt))["spec"]["activeDeadlineSeconds"]
        return float(deadline) + self.tuning.deadline_margin

    def _past_limit(self, handle: RunHandle, pods: list[dict[str, Any]], limit: float) -> Outcome:
        """wait()'s bound has passed: the Job's word if it has one; else the Job goes and the attempt fails."""
        job, missing = self._read_job(handle)
        verdict = diagnose(pods, job, waited={}, image_pull_grace=float("inf"), unschedulable_grace=float("inf"),
                           job_known_missing=missing)
        if verdict.outcome is not None:
            return verdict.outcome
        message = (f"no end of Job {handle.name} was seen within {limit:.0f}s (its activeDeadlineSeconds plus a "
                   "margin); the Job was deleted")
        try:
            self.batch.delete_namespaced_job(handle.name, handle.namespace or "", **PLAIN,
                                             body=kubernetes.client.V1DeleteOptions(propagation_policy="Background"))
        except ApiException as exc:
            if exc.status != 404:
                message = f"no end of Job {handle.name} was seen within {limit:.0f}s; deleting it failed: " \
                          f"{api_error(exc, 'delete Job')}"
        except TRANSPORT as exc:
            message = f"no end of Job {handle.name} was seen within {limit:.0f}s; deleting it failed: " \
                      f"{unreachable(exc, 'delete Job')}"
        log.warning("%s", message)
        return Outcome(status=TaskStatus.FAILED, reason=contract.Reason.WAIT_DEADLINE, message=message)

    def _let_go(self, handle: RunHandle, followers: dict[str, LogFollower], pods: list[dict[str, Any]]) -> None:
        """The outcome is known. Followers of ended containers deliver the rest of the log first (briefly);
        those of containers still running (holding their files) go on by themselves, up to a bound."""
        ended = [f for f in followers.values() if _container_ended(pods, f.pod)]
        for follower in ended:
            follower.wake()
        until = time.monotonic() + self.tuning.log_drain
        for follower in ended:
            follower.join(max(0.0, until - time.monotonic()))
        bound = time.monotonic() + self.settings.artifacts_hold_timeout + self.tuning.deadline_margin
        with self._lock:
            for follower in followers.values():
                if not follower.ended.is_set():  # else on_end has run or waits for this lock: not kept
                    follower.expire_at(bound)
                    self._followers.setdefault((handle.namespace or "", handle.name), []).append(follower)

    def _read_job(self, handle: RunHandle) -> tuple[dict[str, Any] | None, bool]:
        try:
            response = self.batch.read_namespaced_job(handle.name, handle.namespace or "", **PLAIN)
            return json.loads(response.data), False
        except ApiException as exc:
            if exc.status == 404:
                return None, True
            raise api_error(exc, f"read Job {handle.name}") from None
        except TRANSPORT as exc:
            raise unreachable(exc, f"read Job {handle.name}") from None

    def _reported_final(self, handle: RunHandle) -> bool:
        try:
            return self.store.get_task(handle.task_id).status.terminal
        except LookupError:
            return False

    def _reported_outcome(self, handle: RunHandle) -> Outcome:
        """The agent holds its container (its exit status cannot be seen yet): its report decides."""
        return outcome_of(AgentExit(code=None), agent_report(self.store, handle.task_id))

    def _follow(self, handle: RunHandle, pod: str, wake: Callable[[], None], on_log: LogSink | None,
                holding: set[str]) -> LogFollower:
        source = f"pod/{pod}"[:64]
        namespace = handle.namespace or ""
        # The follower's own view of the Pod: it may outlive wait() (the agent holds its files).
        end = _PodEnd(self.api, namespace, self.tuning, handle.name, pod)

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
                self.store.add_logs(handle.task_id, source, [LogLine(seq=seq, level=level, message=text,
                                                                     ts=parse_stamp(stamp))])
            if problem is not None:
                raise problem

        def on_end(follower: LogFollower) -> None:
            end.close()
            wake()  # a waiter hears of it (a follower that stopped early changes its course)
            with self._lock:
                kept = self._followers.get((namespace, handle.name), [])
                if follower in kept:
                    kept.remove(follower)
                if not kept:
                    self._followers.pop((namespace, handle.name), None)

        return LogFollower(self.api, namespace, pod, on_line, finished, read_timeout=self.tuning.read_timeout,
                           on_end=on_end).start()

    # --- artifacts -------------------------------------------------------------------------------------
    def collect(self, handle: RunHandle, dest: Path) -> CollectResult:
        """exec mode: tar the agent's artifacts directory out of its holding container, then release it.
        Never raises: whatever prevents it is recorded as "artifacts lost: <reason>"; the task's status
        stays as it is."""
        if self.settings.artifacts_mode == "upload":
            return CollectResult(uploaded=True)  # the agent sent them to the keruta API, which recorded them
        if self.settings.artifacts_mode != "exec":
            return CollectResult()
        try:
            return self._collect(handle, dest)
        except Exception as exc:  # a bug, or something nobody foresaw: still one line, and the flow goes on
            log.error("collecting the files of Job %s failed unexpectedly", handle.name, exc_info=True)
            return CollectResult(lost=f"artifacts lost: unexpected {type(exc).__name__} while collecting: {exc}")

    def _collect(self, handle: RunHandle, dest: Path) -> CollectResult:
        gone = CollectResult(lost="artifacts lost: the agent's Pod is gone or its container has stopped "
                                  "(was keruta.artifacts.hold-timeout too short?)")
        pod = self._holding_pod(handle)
        if pod is None:
            return gone
        source = self.settings.artifacts_dir
        timeout = self.tuning.exec_read_timeout
        try:
            result = collect_directory(self.api, handle.namespace or "", pod, source, dest,
                                       max_file_size=self.settings.artifacts_max_file_size,
                                       max_total_size=self.settings.artifacts_max_total_size, timeout=timeout)
        except ContainerGone:  # it stopped just now, before the watch said so: nothing to release either
            return gone
        except (ArtifactsLost, ArchiveRejected) as exc:
            result = CollectResult(lost=f"artifacts lost: {exc}")
        except OSError as exc:
            result = CollectResult(lost=f"artifacts lost: cannot write them under {dest}: {exc}")
        except Exception:
            self._release(handle, pod)
            raise  # collect() turns it into a reason naming its type
        self._release(handle, pod)
        return result

    def _release(self, handle: RunHandle, pod: str) -> None:
        """Let the holding agent go (it exits and the Job completes); a failure is logged, never raised."""
        marker = f"{self.settings.artifacts_dir}/{contract.COLLECTED_MARKER}"
        problem = release(self.api, handle.namespace or "", pod, marker, self.tuning.exec_read_timeout)
        if problem is not None:
            log.warning("the agent of Pod %s was not released (%s); it exits when its hold timeout passes",
                        pod, problem)

    def _holding_pod(self, handle: RunHandle) -> str | None:
        subscription = subscribe(self.api, handle.namespace or "", self.tuning, handle.name, listen=False)
        try:
            for pod in sorted(subscription.pods(), key=lambda p: p["metadata"].get("creationTimestamp", ""),
                              reverse=True):
                for status in (pod.get("status") or {}).get("containerStatuses") or []:
                    if status.get("name") == "main" and "running" in (status.get("state") or {}):
                        return str(pod["metadata"]["name"])
        finally:
            subscription.close()
        return None

    # --- cancel ------------------------------------------------------------------------------------
    def cancel(self, handle: RunHandle) -> str | None:
        """Delete the Job (Foreground: its Pods first) and wait until its Pods are gone.

        None when they are gone; else (after ``tuning.cancel_wait`` seconds) one line naming the Job and
        the Pods still there, also logged as a warning, for the caller to record."""
        assert handle.namespace is not None
        try:
            self.batch.delete_namespaced_job(handle.name, handle.namespace, **PLAIN,
                                             body=kubernetes.client.V1DeleteOptions(propagation_policy="Foreground"))
        except ApiException as exc:
            if exc.status != 404:
                raise api_error(exc, f"delete Job {handle.name}") from None
        except TRANSPORT as exc:
            raise unreachable(exc, f"delete Job {handle.name}") from None
        with self._lock:
            kept = list(self._followers.get((handle.namespace, handle.name), []))
        for follower in kept:
            follower.stop()
        subscription = subscribe(self.api, handle.namespace, self.tuning, handle.name)
        deadline = time.monotonic() + self.tuning.cancel_wait
        try:
            while subscription.pods() or not subscription.synced:
                if time.monotonic() >= deadline:
                    left = sorted(p["metadata"]["name"] for p in subscription.pods())
                    message = (f"Job {handle.namespace}/{handle.name} was deleted, but after "
                               f"{self.tuning.cancel_wait:.0f}s its Pods are still there: "
                               f"{', '.join(left) or '(unknown: the watch cannot list them)'} (a finalizer, or a "
                               "node that does not answer?); Kubernetes removes them when it can")
                    log.warning("%s", message)
                    return message
                event = subscription.get(timeout=0.5)
                if not subscription.alive or (event is not None and event[0] == WATCH_ENDED):
                    subscription.close()
                    subscription = subscribe(self.api, handle.namespace, self.tuning, handle.name)
            return None
        finally:
            subscription.close()

    def attempts_of_flow_run(self, flow_run_id: str, namespaces: Iterable[str]) -> list[RunHandle]:
        """The unfinished agent Jobs a flow run created, found by label (no in-memory handle needed), in
        the default namespace and each of ``namespaces``. A namespace that does not exist is skipped; one
        that cannot be listed (forbidden, an API error) is skipped with a warning, so the others still count.
        Raises only when not one namespace could be listed."""
        handles = []
        selector = f"{SELECTOR},{LABEL_FLOW_RUN}={label_value(flow_run_id)}"
        wanted = sorted({n for n in namespaces if n} | {self.settings.default_namespace})
        failures: list[Exception] = []
        for namespace in wanted:
            try:
                body = json.loads(self.batch.list_namespaced_job(namespace, label_selector=selector,
                                                                 **PLAIN).data)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                failure = api_error(exc, f"list Jobs of flow run {flow_run_id} in namespace {namespace}")
                log.warning("%s; its Jobs are not found", failure)
                failures.append(failure)
                continue
            except TRANSPORT as exc:
                failure = unreachable(exc, f"list Jobs of flow run {flow_run_id} in namespace {namespace}")
                log.warning("%s; its Jobs are not found", failure)
                failures.append(failure)
                continue
            for job in body.get("items") or []:
                meta = job["metadata"]
                handles.append(RunHandle(backend=self.name, task_id=(meta.get("annotations") or {}).get(ANNOTATION_TASK,
                                         ""), attempt=int((meta.get("labels") or {}).get(LABEL_ATTEMPT, 1)),
                                         flow_run_id=flow_run_id, name=meta["name"], namespace=namespace,
                                         uid=meta.get("uid")))
        if failures and len(failures) == len(wanted):
            raise failures[0]
        return handles

    def exists(self, handle: RunHandle) -> bool:
        job, missing = self._read_job(handle)
        return not missing and job is not None

    def can_reattach(self, handle: RunHandle) -> bool:
        """A Job's agent reports to the keruta API, not to this process: any process can follow it."""
        return True


def _container_ended(pods: list[dict[str, Any]], pod: str) -> bool:
    """The main container of ``pod`` has terminated, or the Pod is gone."""
    for current in pods:
        if current["metadata"]["name"] == pod:
            for status in (current.get("status") or {}).get("containerStatuses") or []:
                if status.get("name") == "main" and "terminated" in (status.get("state") or {}):
                    return True
            return False
    return True


class _PodEnd:
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
        return _container_ended(self._current().pods(), self.pod)

    def settled(self) -> bool:
        """After the log stream ended: wait (at most 1 s) for the watch to show the container's end."""
        subscription = self._current()
        subscription.settle(lambda: not _container_ended(subscription.pods(), self.pod), 1.0)
        return self.ended()

    def close(self) -> None:
        with self._lock:
            if self.subscription is not None:
                self.subscription.close()
                self.subscription = None


def parse_stamp(stamp: str) -> datetime | None:
    """An RFC 3339 timestamp of a log line (nanoseconds cut to microseconds); None if it is not one."""
    try:
        head, _, fraction = stamp.rstrip("Z").partition(".")
        return datetime.fromisoformat(f"{head}.{(fraction + '000000')[:6]}").replace(tzinfo=UTC)
    except ValueError:
        return None


__all__ = ["KubernetesBackend", "WatchTuning", "api_error"]
