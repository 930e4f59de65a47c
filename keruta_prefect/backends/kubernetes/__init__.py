"""The Kubernetes backend: each attempt of a keruta task is an agent Job.

launch: create the task tree's PVC (if any) and the Job; a Job of the same task attempt that already
exists is reattached to, anything else named alike is an error. wait: the shared namespace watch feeds
the Pods of the Job to `diagnose`; started Pods' logs are followed into the Prefect run log; the Job is
read only when the Pods cannot tell. cancel: Foreground deletion, then wait until the Pods are gone.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from keruta_prefect.agent.runner import COLLECTED_MARKER, READY_LINE
from keruta_prefect.artifacts import ArchiveRejected, CollectResult
from keruta_prefect.backends.base import BackendError, LogSink, Outcome, RunContext, RunHandle, TransientBackendError
from keruta_prefect.backends.kubernetes.client import api_client, api_detail
from keruta_prefect.backends.kubernetes.diagnose import diagnose, waiting_keys
from keruta_prefect.backends.kubernetes.exec import ArtifactsLost, collect_directory, exec_command
from keruta_prefect.backends.kubernetes.logs import LogFollower
from keruta_prefect.backends.kubernetes.watch import DEFAULT_TUNING, WatchTuning, shared_watch
from keruta_prefect.manifest import (
    ANNOTATION_TASK,
    LABEL_ATTEMPT,
    LABEL_FLOW_RUN,
    LABEL_TASK,
    SELECTOR,
    JobContext,
    build_job,
    build_pvc,
    label_value,
    namespace_of,
)
from keruta_prefect.models import Task
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import LogLine, Store

log = logging.getLogger("keruta.kubernetes")
TRANSIENT = {0, 408, 429, 500, 502, 503, 504}



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

    # --- launch ------------------------------------------------------------------------------------
    def launch(self, task: Task, ctx: RunContext) -> RunHandle:
        jctx = JobContext(attempt=ctx.attempt, flow_run_id=ctx.flow_run_id, root_task_id=ctx.root_task_id,
                          has_children=ctx.has_children)
        namespace = namespace_of(task, self.settings)
        pvc = build_pvc(task, self.settings, jctx)
        if pvc is not None:
            self._ensure_pvc(namespace, pvc)
        job = build_job(task, self.settings, jctx)
        name = job["metadata"]["name"]
        try:
            response = self.batch.create_namespaced_job(namespace, job, _preload_content=False)
            created = json.loads(response.data)
        except ApiException as exc:
            if exc.status != 409:
                raise api_error(exc, f"create Job {name} in namespace {namespace}") from None
            created = self._existing(namespace, name, task, ctx)
        return RunHandle(backend=self.name, task_id=task.id, attempt=ctx.attempt, flow_run_id=ctx.flow_run_id,
                         name=name, namespace=namespace, uid=created["metadata"].get("uid"))

    def _existing(self, namespace: str, name: str, task: Task, ctx: RunContext) -> dict[str, Any]:
        """The Job already there: this very attempt (reattach), or a clear error."""
        try:
            existing = json.loads(self.batch.read_namespaced_job(name, namespace, _preload_content=False).data)
        except ApiException as exc:
            raise api_error(exc, f"read Job {name} in namespace {namespace}") from None
        labels = existing["metadata"].get("labels") or {}
        if labels.get(LABEL_TASK) == label_value(task.id) and labels.get(LABEL_ATTEMPT) == str(ctx.attempt):
            log.info("Job %s/%s of this task attempt exists already; reattaching", namespace, name)
            return existing
        raise BackendError(f"a Job named {name} already exists in namespace {namespace} and is not attempt "
                           f"{ctx.attempt} of task {task.id}; delete it or rename the task")

    def _ensure_pvc(self, namespace: str, pvc: dict[str, Any]) -> None:
        name = pvc["metadata"]["name"]
        try:
            self.core.create_namespaced_persistent_volume_claim(namespace, pvc, _preload_content=False)
        except ApiException as exc:
            if exc.status != 409:
                raise api_error(exc, f"create PersistentVolumeClaim {name} in namespace {namespace}") from None
            # Already there: the task tree's volume, created by an earlier task of the tree.

    def delete_volume(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_persistent_volume_claim(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise api_error(exc, f"delete PersistentVolumeClaim {name}") from None

    # --- wait --------------------------------------------------------------------------------------
    def wait(self, handle: RunHandle, on_log: LogSink | None = None) -> Outcome:
        assert handle.namespace is not None
        watch = shared_watch(self.api, handle.namespace, self.tuning)
        subscription = watch.subscribe(handle.name)
        seen_waiting: dict[str, float] = {}
        followers: dict[str, LogFollower] = {}
        holding: set[str] = set()  # pods whose agent has reported and holds its files for collection
        said: set[str] = set()
        job: dict[str, Any] | None = None
        job_missing = False
        last_job_read = time.monotonic()
        try:
            while True:
                event = subscription.get(timeout=0.5)
                pods = subscription.pods()
                now = time.monotonic()
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
                    if note not in said:
                        said.add(note)
                        log.warning("%s", note)
                        if on_log is not None:
                            on_log("WARN", note)
                for pod in verdict.started:
                    if pod not in followers:
                        followers[pod] = self._follow(handle, pod, subscription, on_log, holding)
                if verdict.outcome is None and holding:
                    # The agent finished and keeps its container for collection: its own report is the outcome.
                    verdict.outcome = self._reported_outcome(handle)
                if verdict.outcome is not None:
                    for follower in followers.values():
                        follower.join(15)  # the rest of the log, before the outcome is recorded
                    return self._with_task_report(handle, verdict.outcome)
        finally:
            subscription.close()
            for follower in followers.values():
                follower.stop()

    def _read_job(self, handle: RunHandle) -> tuple[dict[str, Any] | None, bool]:
        try:
            response = self.batch.read_namespaced_job(handle.name, handle.namespace or "", _preload_content=False)
            return json.loads(response.data), False
        except ApiException as exc:
            if exc.status == 404:
                return None, True
            raise api_error(exc, f"read Job {handle.name}") from None

    def _reported_outcome(self, handle: RunHandle) -> Outcome:
        task = self.store.get_task(handle.task_id)
        if task.status == "COMPLETED":
            return Outcome(status=task.status, exit_code=0, message=task.message or "the task completed")
        return self._with_task_report(handle, Outcome(status=task.status, exit_code=1, reason="SCRIPT_FAILED"))

    def _follow(self, handle: RunHandle, pod: str, subscription: Any, on_log: LogSink | None,
                holding: set[str]) -> LogFollower:
        source = f"pod/{pod}"[:64]

        def ended() -> bool:
            for current in subscription.pods():
                if current["metadata"]["name"] == pod:
                    for status in (current.get("status") or {}).get("containerStatuses") or []:
                        if status.get("name") == "main" and "terminated" in (status.get("state") or {}):
                            return True
                    return False
            return True  # the Pod is gone

        def finished() -> bool:
            # The log stream ended cleanly: the container's end is usually on its way through the watch.
            # Wait for it (briefly) rather than reconnect to the log at once.
            subscription.settle(lambda: not ended(), 1.0)
            return ended()

        def on_line(stamp: str, text: str) -> None:
            if text.startswith(f"keruta-agent INFO {READY_LINE}"):
                holding.add(pod)
            level = "ERROR" if " ERROR " in text[:30] else "WARN" if " WARNING " in text[:30] else "INFO"
            if on_log is not None:
                on_log(level, text)
            if text.startswith("keruta-agent "):
                # The agent's own words (its script's lines reach the store through the keruta API):
                # kept with the task, once, numbered by their place in this Pod's log.
                ts = parse_stamp(stamp)
                self.store.add_logs(handle.task_id, source, [LogLine(seq=follower.lines, level=level, message=text,
                                                                     ts=ts)])

        follower = LogFollower(self.api, handle.namespace or "", pod, on_line, finished,
                               read_timeout=self.tuning.read_timeout)
        return follower

    def _with_task_report(self, handle: RunHandle, outcome: Outcome) -> Outcome:
        """A failed script: the agent reported why (errorCode, message) to the API; use its words."""
        if outcome.reason == "SCRIPT_FAILED":
            try:
                task = self.store.get_task(handle.task_id)
            except LookupError:
                return outcome
            return outcome.model_copy(update={"reason": task.error_code or outcome.reason,
                                              "message": task.message or outcome.message})
        return outcome

    # --- artifacts -------------------------------------------------------------------------------------
    def collect(self, handle: RunHandle, dest: Path) -> CollectResult:
        """exec mode: tar the agent's artifacts directory out of its holding container, then release it.
        Whatever prevents it is recorded as "artifacts lost: <reason>"; the task's status stays as it is."""
        if self.settings.artifacts_mode == "upload":
            return CollectResult(uploaded=True)  # the agent sent them to the keruta API, which recorded them
        if self.settings.artifacts_mode != "exec":
            return CollectResult()
        pod = self._holding_pod(handle)
        if pod is None:
            return CollectResult(lost="artifacts lost: the agent's Pod is gone or its container has stopped "
                                      "(was keruta.artifacts.hold-timeout too short?)")
        source = self.settings.artifacts_dir
        try:
            return collect_directory(self.api, handle.namespace or "", pod, source, dest,
                                     max_file_size=self.settings.artifacts_max_file_size,
                                     max_total_size=self.settings.artifacts_max_total_size)
        except (ArtifactsLost, ArchiveRejected) as exc:
            return CollectResult(lost=f"artifacts lost: {exc}")
        finally:
            try:  # release the agent: it exits and the Job completes
                exec_command(self.api, handle.namespace or "", pod,
                             ["touch", f"{source}/{COLLECTED_MARKER}"]).run_forever(timeout=10)  # type: ignore[attr-defined]
            except ArtifactsLost:
                pass

    def _holding_pod(self, handle: RunHandle) -> str | None:
        watch = shared_watch(self.api, handle.namespace or "", self.tuning)
        subscription = watch.subscribe(handle.name)
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
    def cancel(self, handle: RunHandle) -> None:
        """Delete the Job (Foreground: its Pods first) and wait until its Pods are gone."""
        assert handle.namespace is not None
        try:
            self.batch.delete_namespaced_job(handle.name, handle.namespace, _preload_content=False,
                                             body=kubernetes.client.V1DeleteOptions(propagation_policy="Foreground"))
        except ApiException as exc:
            if exc.status != 404:
                raise api_error(exc, f"delete Job {handle.name}") from None
        watch = shared_watch(self.api, handle.namespace, self.tuning)
        subscription = watch.subscribe(handle.name)
        deadline = time.monotonic() + 120
        try:
            while subscription.pods() and time.monotonic() < deadline:
                subscription.get(timeout=0.5)
        finally:
            subscription.close()

    def jobs_of_flow_run(self, flow_run_id: str, namespaces: set[str]) -> list[RunHandle]:
        """The unfinished agent Jobs a flow run created, found by label (no in-memory handle needed)."""
        handles = []
        selector = f"{SELECTOR},{LABEL_FLOW_RUN}={label_value(flow_run_id)}"
        for namespace in sorted(namespaces | {self.settings.default_namespace}):
            try:
                body = json.loads(self.batch.list_namespaced_job(namespace, label_selector=selector,
                                                                 _preload_content=False).data)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise api_error(exc, f"list Jobs of flow run {flow_run_id}") from None
            for job in body.get("items") or []:
                meta = job["metadata"]
                handles.append(RunHandle(backend=self.name, task_id=(meta.get("annotations") or {}).get(ANNOTATION_TASK,
                                         ""), attempt=int((meta.get("labels") or {}).get(LABEL_ATTEMPT, 1)),
                                         flow_run_id=flow_run_id, name=meta["name"], namespace=namespace,
                                         uid=meta.get("uid")))
        return handles

    def exists(self, handle: RunHandle) -> bool:
        job, missing = self._read_job(handle)
        return not missing and job is not None


def parse_stamp(stamp: str) -> datetime | None:
    """An RFC 3339 timestamp of a log line (nanoseconds cut to microseconds); None if it is not one."""
    try:
        head, _, fraction = stamp.rstrip("Z").partition(".")
        return datetime.fromisoformat(f"{head}.{(fraction + '000000')[:6]}").replace(tzinfo=UTC)
    except ValueError:
        return None


__all__ = ["KubernetesBackend", "WatchTuning", "api_error"]
