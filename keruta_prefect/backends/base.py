"""The Backend protocol: launch, wait, collect, cancel. Errors are values with a reason.

A backend raises :class:`TransientBackendError` for what a retry can fix (an API hiccup, a dropped
watch): the flow's Prefect tasks retry exactly those. Everything about how the *task* ended is an
:class:`Outcome`, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from keruta_prefect.artifacts import CollectResult
from keruta_prefect.errors import PermanentError, TransientError
from keruta_prefect.models import Resources, RunContext, Task
from keruta_prefect.outcomes import AgentReport, Outcome
from keruta_prefect.store import Store


class TransientBackendError(TransientError, RuntimeError):
    """Worth another try of the same step (Prefect retries it with backoff)."""


class BackendError(PermanentError, RuntimeError):
    """A permanent problem with the backend's configuration or the cluster; one line for a person."""


class RunHandle(BaseModel):
    """Enough to find the running attempt again, also from another process (no in-memory handles)."""

    backend: str
    task_id: str
    attempt: int
    flow_run_id: str | None = None
    name: str  # Job name, or the local work directory's name
    namespace: str | None = None
    uid: str | None = None
    pid: int | None = None
    resources: Resources | None = None  # the requests and limits the backend gave the attempt
    timeout_seconds: int | None = None  # the timeout it gave the attempt's script


LogSink = Callable[[str, str], None]  # (level, message)


class Backend(Protocol):
    name: str

    def launch(self, task: Task, ctx: RunContext) -> RunHandle: ...

    def wait(self, handle: RunHandle, on_log: LogSink | None = None) -> Outcome: ...

    def collect(self, handle: RunHandle, dest: Path) -> CollectResult: ...

    def cancel(self, handle: RunHandle) -> str | None:
        """Stop the attempt's agent; None when it is gone, else one line saying what is still there."""
        ...

    def exists(self, handle: RunHandle) -> bool: ...

    def can_reattach(self, handle: RunHandle) -> bool:
        """Can this process follow an unfinished attempt that ``exists`` (its agent can still report)?"""
        ...

    def attempts_of_flow_run(self, flow_run_id: str, namespaces: Iterable[str]) -> list[RunHandle]:
        """Attempts a flow run started that are still there, found in the backend itself (not in the run
        records: an attempt started just before a crash may never have been recorded)."""
        ...

    def release_volume(self, task: Task, root_task_id: str) -> str | None:
        """Delete the volume the task tree rooted at ``root_task_id`` shares (the flow calls this when the
        tree is done); the volume's name, or None when this backend keeps none."""
        ...


def agent_report(store: Store, task_id: str) -> AgentReport | None:
    """What the agent reported for the task (its stored status, errorCode and message); None if the
    task is not in the store."""
    try:
        task = store.get_task(task_id)
    except LookupError:
        return None
    return AgentReport(status=task.status, error_code=task.error_code, message=task.message)


__all__ = ["Backend", "BackendError", "LogSink", "Outcome", "RunContext", "RunHandle", "TransientBackendError",
           "agent_report"]
