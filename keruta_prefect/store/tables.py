"""The database tables (SQLModel) and the rows they hold: tasks, task runs, claim leases, log lines, artifacts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from keruta_prefect.errors import PermanentError
from keruta_prefect.models import Task, TaskStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class TaskRow(SQLModel, table=True):
    __tablename__ = "keruta_tasks"

    id: str = Field(primary_key=True, max_length=512)
    title: str = ""
    description: str = Field(default="", sa_column=Column(Text, nullable=False))
    priority: int = Field(default=0, index=True)
    status: str = Field(default=TaskStatus.PENDING.value, index=True, max_length=32)
    documents: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    image: str | None = None
    namespace: str | None = None
    additional_env: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    repository_id: str | None = None
    repository_url: str | None = None
    repository_ref: str | None = None
    repository_secret: str | None = None
    parent_id: str | None = Field(default=None, index=True)
    session: str | None = None
    storage_class: str | None = None
    pvc_name: str | None = None
    script: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    timeout_seconds: int | None = None
    resources: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    progress: int | None = None
    message: str | None = Field(default=None, sa_column=Column(Text))
    error_code: str | None = None
    claimed_by: str | None = Field(default=None, max_length=128)  # the flow run that is to run it
    # What the current attempt's agent reported its script used (models.Usage, camelCase), held here until the
    # attempt's run is finished (RunQueries.update_run moves it there): the agent may report before the flow
    # has written the run (it writes it when the backend's launch returns). Not part of Task.
    usage: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    def to_task(self) -> Task:
        data = self.model_dump(exclude={"claimed_by", "usage"})
        for key in ("created_at", "updated_at"):
            if data[key].tzinfo is None:  # SQLite drops the zone; everything is stored in UTC
                data[key] = data[key].replace(tzinfo=UTC)
        return Task.model_validate(data)

    @classmethod
    def from_task(cls, task: Task) -> TaskRow:
        data = task.model_dump(mode="json", by_alias=False)
        data["created_at"] = task.created_at
        data["updated_at"] = task.updated_at
        return cls.model_validate(data)


class TaskRunRow(SQLModel, table=True):
    __tablename__ = "keruta_task_runs"

    id: int | None = Field(default=None, primary_key=True)
    task_id: str = Field(index=True, max_length=512)
    flow_run_id: str | None = Field(default=None, index=True)
    backend: str = "local"
    attempt: int = 1
    status: str = TaskStatus.IN_PROGRESS.value
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = Field(default=None, sa_column=Column(Text))
    job_name: str | None = None
    namespace: str | None = None
    job_uid: str | None = None
    pid: int | None = None
    artifacts_note: str | None = Field(default=None, sa_column=Column(Text))
    # The requests and limits the attempt ran with (Resources, camelCase), as its backend applied them.
    resources: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    usage: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # Usage, as the agent sent it
    timeout_seconds: int | None = None  # the timeout the attempt's script ran with (a retry may raise it)
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class ClaimLeaseRow(SQLModel, table=True):
    """How long a claim holder (a flow run) is known to be working: renewed while it runs (see claims.py)."""

    __tablename__ = "claim_leases"
    owner: str = Field(primary_key=True, max_length=128)
    expires_at: datetime


class LogRow(SQLModel, table=True):
    __tablename__ = "keruta_task_logs"
    __table_args__ = (UniqueConstraint("task_id", "source", "seq", name="uq_keruta_log_line"),)

    id: int | None = Field(default=None, primary_key=True)
    task_id: str = Field(index=True, max_length=512)
    source: str = Field(default="api", max_length=64)
    seq: int
    level: str = Field(default="INFO", max_length=16)
    message: str = Field(sa_column=Column(Text, nullable=False))
    ts: datetime = Field(default_factory=utcnow)


class ArtifactRow(SQLModel, table=True):
    __tablename__ = "keruta_artifacts"
    __table_args__ = (UniqueConstraint("task_id", "run_id", "path", name="uq_keruta_artifact"),)

    id: int | None = Field(default=None, primary_key=True)
    task_id: str = Field(index=True, max_length=512)
    run_id: int | None = Field(default=None, index=True)
    path: str = Field(sa_column=Column(Text, nullable=False))
    size: int
    sha256: str = Field(max_length=64)
    location: str = Field(sa_column=Column(Text, nullable=False))
    description: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class TaskNotFound(PermanentError, LookupError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} not found")
        self.task_id = task_id


class TaskExists(PermanentError, ValueError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} already exists")
        self.task_id = task_id


class LogLine(SQLModel):
    seq: int
    level: str = "INFO"
    message: str
    ts: datetime | None = None
