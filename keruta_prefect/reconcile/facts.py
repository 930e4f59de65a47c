"""What the reconciler looks at, gathered into :class:`Facts`: keruta's Jobs, Pods and volumes in every namespace
the settings, the stored tasks and the live flow runs name; the stored tasks, attempts and claims; the Prefect
state of every flow run they name (one batched request per 200 ids); the local agents and work directories."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.client.schemas.objects import StateType

from keruta_prefect import contract
from keruta_prefect.backends.base import BackendError
from keruta_prefect.backends.local import agent_processes
from keruta_prefect.cancel import task_namespaces
from keruta_prefect.claims import FINAL_STATES, state_type
from keruta_prefect.manifest import ANNOTATION_TASK, LABEL_ATTEMPT, LABEL_FLOW_RUN, LABEL_TASK, namespace_of
from keruta_prefect.models import Task, TaskStatus
from keruta_prefect.reconcile.plan import AgentFact, Facts, KubeObject, RunFact, TaskFact, WorkDirFact
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store
from keruta_prefect.trees import tree_tasks
from keruta_prefect.validation import exception_line

if TYPE_CHECKING:
    from keruta_prefect.backends.kubernetes.context import Kube

# A flow run without a state yet is being created: as good as Pending (alive).
UNKNOWN_STATE = "UNKNOWN"  # a flow run whose state could not be trusted: counted as alive (not a final state)
FLOW_RUN_BATCH = 200  # ids per read_flow_runs request (the Prefect API's default page)
KERUTA_TASK_FLOW = "keruta-task"


def stamp(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def kube_object(item: dict[str, Any]) -> KubeObject:
    """One listed Job, Pod or PersistentVolumeClaim (with the ``kind`` the listing added) as a fact."""
    meta = item.get("metadata") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    status = item.get("status") or {}
    if item["kind"] == "Job":
        finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                       for c in status.get("conditions") or [])
    else:
        finished = status.get("phase") in ("Succeeded", "Failed")
    owner = next((ref.get("name") for ref in meta.get("ownerReferences") or [] if ref.get("kind") == "Job"), None)
    attempt = labels.get(LABEL_ATTEMPT)
    return KubeObject(kind=item["kind"], name=meta["name"], namespace=meta.get("namespace") or "",
                      uid=meta.get("uid"), created=stamp(meta.get("creationTimestamp")),
                      task_id=notes.get(ANNOTATION_TASK) or labels.get(LABEL_TASK),
                      flow_run_id=labels.get(LABEL_FLOW_RUN), attempt=int(attempt) if attempt and attempt.isdigit()
                      else None, owner_job=owner, finished=finished, deleting=bool(meta.get("deletionTimestamp")))


def _uuids(ids: Iterable[str]) -> list[uuid.UUID]:
    found = set()
    for text in ids:
        try:
            found.add(uuid.UUID(text))
        except (ValueError, TypeError):
            pass  # not a flow run id (e.g. a test's name): Prefect cannot know it
    return sorted(found)


def flow_run_states(ids: Iterable[str]) -> dict[str, tuple[str, datetime | None]]:
    """The Prefect state type of each flow run that exists, and when it entered that state; one request per
    FLOW_RUN_BATCH ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    wanted = _uuids(ids)
    states: dict[str, tuple[str, datetime | None]] = {}
    with get_client(sync_client=True) as client:
        for start in range(0, len(wanted), FLOW_RUN_BATCH):
            chunk = wanted[start:start + FLOW_RUN_BATCH]
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)),
                                             limit=len(chunk)):
                if (state := state_type(run)) is not None:  # stateless: holds and owns nothing, as if gone
                    states[str(run.id)] = (state, run.state.timestamp if run.state else None)
    return states


def temporary_prefect() -> bool:
    """Is the Prefect API this process talks to a temporary server of its own (PREFECT_API_URL unset)?"""
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


def prefect_api() -> str:
    """Which Prefect API answers (for a report): its URL, or Prefect's temporary server."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "Prefect's temporary server (PREFECT_API_URL is not set)"


def live_task_flow_runs() -> list[tuple[str, str, dict[str, Any]]]:
    """(id, state, parameters) of every keruta-task flow run not in a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    final = [StateType(value) for value in FINAL_STATES]
    found: list[tuple[str, str, dict[str, Any]]] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[KERUTA_TASK_FLOW])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=final))),
                sort=FlowRunSort.ID_DESC, limit=FLOW_RUN_BATCH, offset=len(found))
            found.extend((str(r.id), state_type(r) or StateType.PENDING.value, r.parameters or {}) for r in page)
            if len(page) < FLOW_RUN_BATCH:
                return found


def named_task(parameters: dict[str, Any]) -> str | None:
    """The task a keruta-task flow run was given (by id, or the id in its spec)."""
    spec, task_id = parameters.get("task_spec"), parameters.get("task_id")
    if isinstance(task_id, str):
        return task_id
    return spec.get("id") if isinstance(spec, dict) and isinstance(spec.get("id"), str) else None


class Gatherer:
    """Collects the facts of one reconcile pass; what it could not look at is in ``warnings``."""

    def __init__(self, settings: KerutaSettings, store: Store, kube: Kube | None, now: datetime) -> None:
        self.settings, self.store, self.kube = settings, store, kube
        self.facts = Facts(now=now, grace_seconds=settings.reconcile_grace_seconds, kube_enabled=settings.enabled,
                           lost_tasks=settings.reconcile_lost_tasks, max_attempts=settings.task_max_attempts,
                           pvc_retention=settings.pvc_retention)
        self.warnings: list[str] = []
        self.namespaces: set[str] = set()

    def gather(self) -> Facts:
        f = self.facts
        live = live_task_flow_runs()
        for run_id, state, parameters in live:
            f.flow_runs[run_id] = state
            if task_id := named_task(parameters):
                f.named_by.setdefault(task_id, []).append(run_id)
        f.runs = [RunFact.model_validate(row.model_dump()) for row in self.store.all_unfinished_runs()]
        for status in (TaskStatus.IN_PROGRESS, TaskStatus.RETRYING):
            for task in self.store.list_tasks(status, limit=1_000_000):
                self.add_task(task, attempts=True)
        for task, holder in self.store.pending(1_000_000):
            if holder:
                self.add_task(task, holder=holder)
        self.namespaces = ({self.settings.default_namespace} | self.store.namespaces()
                           | {r.namespace for r in f.runs if r.namespace})
        for _run_id, _state, parameters in live:
            self.namespaces |= task_namespaces(self.store, self.settings, parameters)
        self.cluster()
        self.local()
        for task_id in {o.task_id for o in f.objects} | {r.task_id for r in f.runs} | {w.task_id for w in f.work_dirs}:
            self.add_known(task_id)
        for root in {o.task_id for o in f.objects if o.kind == "PersistentVolumeClaim" and o.task_id}:
            members = tree_tasks(self.store, root)
            f.trees[root] = [t.id for t in members]
            for member in members:
                self.add_task(member)
        holders = {t.claimed_by for t in f.tasks.values() if t.claimed_by}
        asked = {o.flow_run_id for o in f.objects} | {r.flow_run_id for r in f.runs} | holders
        asked_ids = [str(u) for u in _uuids(i for i in asked if i and i not in f.flow_runs)]
        found = flow_run_states(asked_ids)
        if asked_ids and not found and not live and temporary_prefect():
            # Prefect's temporary server knows none of the flow runs the records name and runs no keruta
            # task: most likely not the server that ran them (PREFECT_API_URL forgotten, the records in a
            # shared database). "Gone" would fail every task and delete every Job: take them as alive, say so.
            self.warnings.append(f"none of the {len(asked_ids)} flow runs the records name is known to "
                                 f"{prefect_api()}: is it the Prefect API that ran them? They were taken as "
                                 "alive; nothing of theirs was touched")
            found = {run_id: (UNKNOWN_STATE, None) for run_id in asked_ids}
        for run_id, (state, since) in found.items():
            f.flow_runs[run_id] = state
            if since is not None:
                f.flow_run_since[run_id] = since
        return f

    def add_known(self, task_id: str | None) -> None:
        if task_id and task_id not in self.facts.tasks:
            try:
                self.add_task(self.store.get_task(task_id))
            except LookupError:
                pass

    def add_task(self, task: Task, *, holder: str | None = None, attempts: bool = False) -> None:
        if task.id in self.facts.tasks:
            return
        holder = holder if holder is not None else self.store.claim_of(task.id)
        self.facts.tasks[task.id] = TaskFact(
            id=task.id, status=task.status, updated_at=task.updated_at, claimed_by=holder,
            lease_expires=self.store.lease_of(holder) if holder else None,
            attempts=len(self.store.runs(task.id)) if attempts else 0, namespace=namespace_of(task, self.settings))

    def cluster(self) -> None:
        """keruta's labelled objects in every namespace of interest (those that could be listed)."""
        if self.kube is None:
            return
        from keruta_prefect.backends.kubernetes.api import KubeError
        from keruta_prefect.backends.kubernetes.jobs import labelled_objects

        for namespace in sorted(self.namespaces):
            try:
                items = labelled_objects(self.kube, namespace)
            except (KubeError, BackendError) as exc:
                self.warnings.append(f"namespace {namespace} was not looked at: {exception_line(exc)}")
                continue
            self.facts.objects.extend(kube_object(item) for item in items)
            self.facts.kube_checked.add(namespace)

    def local(self) -> None:
        """The local agents and the attempts' work directories under keruta.local.work-root."""
        root = self.settings.work_root()
        for agent in agent_processes(root):
            attempt = agent.work_dir.name.removeprefix("attempt-")
            self.facts.agents.append(AgentFact(pid=agent.pid, task_id=agent.task_id, work_dir=str(agent.work_dir),
                                               attempt=int(attempt) if attempt.isdigit() else None,
                                               started=datetime.fromtimestamp(agent.started, UTC)))
        if not root.is_dir():
            return
        by_dir = {Path(a.work_dir).parent.name: a.task_id for a in self.facts.agents}
        by_dir.update({_safe(t): t for t in [*self.facts.tasks, *(r.task_id for r in self.facts.runs)]})
        for path in sorted(root.glob("*/attempt-*")):
            number = path.name.removeprefix("attempt-")
            if not path.is_dir() or not number.isdigit():
                continue
            task_id = by_dir.get(path.parent.name) or self._stored(path.parent.name)
            self.facts.work_dirs.append(WorkDirFact(path=str(path), task_id=task_id, attempt=int(number),
                                                    modified=_modified(path)))

    def _stored(self, name: str) -> str | None:
        try:
            return self.store.get_task(name).id
        except LookupError:
            return None


def _safe(task_id: str) -> str:
    from keruta_prefect.artifacts import attempt_dir

    return attempt_dir(Path("/"), task_id, 1).parent.name


def _modified(path: Path) -> datetime | None:
    """The latest change of the work directory, its agent directory or the agent's log."""
    times = []
    for candidate in (path, path / contract.AGENT_DIR, path / contract.AGENT_LOG):
        try:
            times.append(candidate.stat().st_mtime)
        except OSError:
            pass
    return datetime.fromtimestamp(max(times), UTC) if times else None
