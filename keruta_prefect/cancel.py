"""Stopping what a flow run started: its agents (found by run record and, per backend, by label) and the
records of their tasks and attempts.

The keruta-task flow's on_cancellation hook runs in Prefect's *runner* process, not the flow's: nothing
here relies on in-memory handles.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from keruta_prefect.backends import get_backend
from keruta_prefect.backends.base import RunHandle
from keruta_prefect.blocks import DEFAULT_BLOCK, load_settings
from keruta_prefect.contract import Reason
from keruta_prefect.manifest import namespace_of
from keruta_prefect.models import InvalidTransition, Resources, TaskSpecError, TaskStatus, parse_task_spec
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store, TaskRunRow, get_store


def handle_of(run: TaskRunRow) -> RunHandle:
    """The handle of a recorded attempt (enough to find it again from any process)."""
    return RunHandle(backend=run.backend, task_id=run.task_id, attempt=run.attempt, flow_run_id=run.flow_run_id,
                     name=run.job_name or "", namespace=run.namespace, uid=run.job_uid, pid=run.pid,
                     resources=Resources.model_validate(run.resources) if run.resources else None,
                     timeout_seconds=run.timeout_seconds)


def stop_flow_run_agents(flow_run_id: str, settings_block: str = DEFAULT_BLOCK,
                         backend: str | None = None, parameters: dict[str, Any] | None = None) -> list[str]:
    """Stop every agent a flow run started that has not finished, and mark its task CANCELLED.

    Used by the flow's on_cancellation hook, which Prefect runs in the *runner* process:
    the agents are found through the run records (flow-run id), never through in-memory handles, and
    on Kubernetes also by the flow-run label, in every namespace the run may have used (the default one,
    the recorded ones, and the task's own, from the flow run's parameters). Returns the ids of the
    tasks stopped.
    """
    store = get_store()
    settings = load_settings(settings_block)
    runs = store.unfinished_runs(flow_run_id)
    handles = {(run.backend, run.job_name): (handle_of(run), run.id) for run in runs}
    # Each backend also finds the attempts by itself (on Kubernetes by label): a Job created just before
    # a crash may never have been recorded.
    namespaces = {run.namespace for run in runs if run.namespace} | task_namespaces(store, settings, parameters or {})
    for name in sorted({run.backend for run in runs} | ({backend} if backend else set())):
        for handle in get_backend(name, settings, store).attempts_of_flow_run(flow_run_id, namespaces):
            handles.setdefault((handle.backend, handle.name), (handle, None))
    stopped = []
    for handle, run_id in handles.values():
        left = get_backend(handle.backend, settings, store).cancel(handle)
        if handle.task_id:
            stopped.append(handle.task_id)
        mark_cancelled(store, handle.task_id, run_id, "the flow run was cancelled" + (f"; {left}" if left else ""))
    return stopped


def task_namespaces(store: Store, settings: KerutaSettings, parameters: dict[str, Any]) -> set[str]:
    """The namespace of the task a keruta-task flow run was given (by spec or by stored id), if any."""
    spec, task_id = parameters.get("task_spec"), parameters.get("task_id")
    try:
        if spec is not None:
            found = parse_task_spec(spec, source="task_spec")
            if task_id is None or found.id == task_id:
                return {namespace_of(found, settings)}
        if isinstance(task_id, str):
            return {namespace_of(store.get_task(task_id), settings)}
    except (TaskSpecError, LookupError):
        pass
    return set()


def mark_cancelled(store: Store, task_id: str, run_id: int | None, message: str) -> None:
    """A stopped attempt: the task CANCELLED (unless it already ended) and its run closed."""
    if task_id:
        set_status_quietly(store, task_id, TaskStatus.CANCELLED, message)
    if run_id is not None:
        store.update_run(run_id, status=TaskStatus.CANCELLED.value, reason=Reason.CANCELLED, message=message,
                         finished_at=datetime.now(UTC))


def set_status_quietly(store: Store, task_id: str, status: TaskStatus, message: str) -> None:
    """Set the status unless the task already ended (a final word — the agent's, a cancel — stands)."""
    try:
        store.set_status(task_id, status, message=message)
    except InvalidTransition:
        pass
