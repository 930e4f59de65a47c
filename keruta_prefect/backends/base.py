"""The Backend protocol: launch, wait, collect, cancel. Errors are values with a reason.

A backend raises :class:`TransientBackendError` for what a retry can fix (an API hiccup, a dropped
watch): the flow's Prefect tasks retry exactly those. Everything about how the *task* ended is an
:class:`Outcome`, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from keruta_prefect.artifacts import CollectResult
from keruta_prefect.models import Task, TaskStatus


class TransientBackendError(RuntimeError):
    """Worth another try of the same step (Prefect retries it with backoff)."""


class BackendError(RuntimeError):
    """A permanent problem with the backend's configuration or the cluster; one line for a person."""


class RunContext(BaseModel):
    """Who is running this attempt: carried into labels, records and the agent's environment."""

    flow_run_id: str | None = None
    attempt: int = 1
    root_task_id: str | None = None  # the root of the task's tree (tasks of a tree share a volume)
    has_children: bool = False  # the task is a parent: its volume outlives it for its children


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


class Outcome(BaseModel):
    """How an attempt ended. ``retryable`` marks system failures worth a new attempt."""

    status: TaskStatus
    exit_code: int | None = None
    reason: str | None = None  # short machine-readable cause: SCRIPT_EXIT_3, TIMEOUT, OOMKilled…
    message: str = ""  # what a person should know or do
    retryable: bool = False


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
