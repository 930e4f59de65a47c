"""The keruta task: statuses and their allowed transitions, task specs (the original's camelCase JSON).

Pure: no I/O. The store persists these; the API and the flows speak them.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic.alias_generators import to_camel

from keruta_prefect.contract import TaskStatus as TaskStatus  # re-exported: models are where most look
from keruta_prefect.errors import PermanentError
from keruta_prefect.validation import (  # noqa: F401 - TASK_ID, MAX_TASK_ID: re-exported
    MAX_TASK_ID,
    TASK_ID,
    check_dns_label,
    check_env_name,
    check_image,
    check_quantity,
    check_task_id,
    one_line,
)

S = TaskStatus
# The original allowed any status after any other. These are the moves a task can really make;
# the same status again is always allowed (progress updates, idempotent retries of a report).
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    S.PENDING: frozenset({S.IN_PROGRESS, S.FAILED, S.CANCELLED}),
    S.IN_PROGRESS: frozenset({S.WAITING_FOR_INPUT, S.RETRYING, S.COMPLETED, S.FAILED, S.CANCELLED}),
    S.WAITING_FOR_INPUT: frozenset({S.IN_PROGRESS, S.COMPLETED, S.FAILED, S.CANCELLED}),
    S.RETRYING: frozenset({S.PENDING, S.IN_PROGRESS, S.FAILED, S.CANCELLED}),
    S.COMPLETED: frozenset(),
    # A failed or cancelled task may be queued again on purpose (a rerun), never resumed in place.
    S.FAILED: frozenset({S.PENDING, S.RETRYING}),
    S.CANCELLED: frozenset({S.PENDING}),
}


class RunContext(BaseModel):
    """Who is running this attempt: carried into labels, records, the Job's manifest and the agent's
    environment."""

    flow_run_id: str | None = None
    attempt: int = 1
    root_task_id: str | None = None  # the root of the task's tree (tasks of a tree share a volume)
    has_children: bool = False  # the task is a parent: its volume outlives it for its children
    # This attempt's resources where they differ from the task's own (a retry after OOMKilled raises the
    # memory): a field set here wins over the task's.
    resources: Resources | None = None
    # This attempt's timeout where it differs from the task's (a retry after its deadline gives it longer).
    timeout_seconds: int | None = Field(None, ge=1)


class InvalidTransition(PermanentError, ValueError):
    def __init__(self, current: TaskStatus, new: TaskStatus) -> None:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing (it is final)"
        super().__init__(f"cannot move a task from {current} to {new}; from {current} it may go to: {allowed}")
        self.current = current
        self.new = new


def check_transition(current: TaskStatus, new: TaskStatus) -> None:
    if new != current and new not in TRANSITIONS[current]:
        raise InvalidTransition(current, new)


class Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


LANGUAGES = {"sh": "sh", "bash": "sh", "shell": "sh", "python": "py", "python3": "py"}
_SHEBANGS = {"bash": "#!/bin/bash", "python": "#!/usr/bin/env python3", "python3": "#!/usr/bin/env python3"}


class Script(Camel):
    """A task's script, as the agent fetches it from `GET /api/v1/tasks/{id}/script`."""

    content: str
    language: str = "sh"
    filename: str = "script.sh"
    parameters: dict[str, str] = Field(default_factory=dict)

    @field_validator("filename")
    @classmethod
    def _filename(cls, value: str) -> str:
        if not value or "/" in value or "\\" in value or value in (".", "..") or "\x00" in value:
            raise ValueError("must be a plain file name (no '/' or '..')")
        return value

    def runnable(self) -> str:
        """The content as the agent writes it: the agent execs the file directly, so it needs `#!`."""
        if self.content.startswith("#!"):
            return self.content
        shebang = _SHEBANGS.get(self.language.lower(), "#!/bin/sh")
        return f"{shebang}\n{self.content}"


def _script(value: Any) -> Any:
    if isinstance(value, str):
        return {"content": value}
    return value


class Resources(Camel):
    """Per-task resources; empty fields fall back to the settings' defaults."""

    cpu_request: str | None = None
    memory_request: str | None = None
    cpu_limit: str | None = None
    memory_limit: str | None = None

    @field_validator("cpu_request", "memory_request", "cpu_limit", "memory_limit")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        return None if value is None else check_quantity(value)


def overlay(base: Resources | None, override: Resources | None) -> Resources | None:
    """``base`` with every field ``override`` sets replaced (None when both are None)."""
    if override is None:
        return base
    if base is None:
        return override
    return base.model_copy(update=override.model_dump(exclude_none=True))


MAX_COUNT = 2**63 - 1  # bytes: what a 64-bit counter (and a database BIGINT) holds
MAX_MEASURE = 1e12  # seconds: some 30,000 years; anything above is not a measurement


class Usage(Camel):
    """What one attempt's script used, as its agent measured it and sent with its final status
    (``usage`` in the status report, camelCase; an agent that does not measure sends none). Fields it
    does not know are ignored: a newer agent's final report is never refused for what it measured."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    # finite and bounded: a JSON column cannot hold Infinity (PostgreSQL refuses it), the summary formats them
    # user + system CPU of its processes
    cpu_seconds: float | None = Field(default=None, ge=0, le=MAX_MEASURE, allow_inf_nan=False)
    peak_memory_bytes: int | None = Field(default=None, ge=0, le=MAX_COUNT)  # the most memory it held at once
    # from the script's start to its end
    wall_seconds: float | None = Field(default=None, ge=0, le=MAX_MEASURE, allow_inf_nan=False)
    log_bytes: int | None = Field(default=None, ge=0, le=MAX_COUNT)  # bytes of output the script wrote
    source: str | None = Field(default=None, max_length=32)  # how it was measured: "cgroup" or "rusage"


def _utcnow() -> datetime:
    return datetime.now(UTC)


INT32 = 2**31
MAX_TIMEOUT = 366 * 24 * 3600  # a year: more is a mistake, and the Job's activeDeadlineSeconds must stay sane


class Task(Camel):
    """A keruta task. Field names and camelCase aliases follow the original keruta."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    title: str = Field("", max_length=1000)
    description: str = Field("", max_length=1_000_000)
    priority: int = Field(0, ge=-INT32, le=INT32 - 1)  # a database INTEGER (PostgreSQL: 32 bits)
    status: TaskStatus = TaskStatus.PENDING
    documents: list[str] = Field(default_factory=list)
    image: str | None = None
    namespace: str | None = None
    additional_env: dict[str, str] = Field(default_factory=dict)
    repository_id: str | None = None
    repository_url: str | None = None
    repository_ref: str | None = None
    repository_secret: str | None = None
    parent_id: str | None = None
    session: str | None = None
    storage_class: str | None = None
    pvc_name: str | None = None
    script: Annotated[Script | None, BeforeValidator(_script)] = None
    timeout_seconds: int | None = Field(None, ge=1, le=MAX_TIMEOUT,
                                        validation_alias=AliasChoices("timeoutSeconds", "timeout"))
    resources: Resources | None = None
    progress: int | None = Field(None, ge=0, le=100)
    message: str | None = None
    error_code: str | None = None
    created_at: datetime = Field(default_factory=_utcnow)
    updated_at: datetime = Field(default_factory=_utcnow)

    @field_validator("id", "parent_id")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        return None if value is None else check_task_id(value)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        """No text field may hold a NUL: PostgreSQL refuses it (a 500 where a 422 belongs)."""
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(text, str) and "\x00" in text for text in texts):
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        return None if value is None else check_image(value)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        return None if value is None else check_dns_label(value)

    @field_validator("additional_env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, env_value in value.items():
            try:
                check_env_name(name)
            except ValueError as exc:
                raise ValueError(f"{name!r}: {exc}") from None
            if name.startswith("KERUTA_"):
                raise ValueError(f"{name!r}: KERUTA_* variables are set by keruta itself")
            if "\x00" in env_value:
                raise ValueError(f"{name!r}: values must not contain NUL characters")
        return value

    @field_validator("repository_url")
    @classmethod
    def _repo_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^(https?://|ssh://|git@)[^\s'\"`$;|&<>]+$", value):
            raise ValueError("must be an https://, ssh:// or git@ URL without spaces or shell characters")
        return value

    def timeout(self, default: int) -> int:
        return self.timeout_seconds or default

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "status": str(self.status)}


class TaskSpecError(PermanentError, ValueError):
    """A bad task spec; ``str()`` is one line naming the field (camelCase, as written) and the value."""


_CAMEL = {name: info.alias or name for name, info in Task.model_fields.items()}


def parse_task_spec(data: str | bytes | dict[str, Any], *, source: str = "task") -> Task:
    """A task from the original's camelCase JSON (text or an already-parsed dict)."""
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TaskSpecError(f"{source}: not valid JSON ({exc})") from None
        except RecursionError:
            raise TaskSpecError(f"{source}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise TaskSpecError(f"{source}: a task spec is a JSON object, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in ("status", "createdAt", "updatedAt", "logs")}
    try:
        return Task.model_validate(data)
    except ValidationError as exc:
        raise TaskSpecError(f"{source}: {one_line(exc, names=_CAMEL)}") from None


class TaskResult(BaseModel):
    """What a `keruta_task` flow returns (and stores): enough to compose with other flows."""

    task_id: str
    status: TaskStatus
    attempt: int = 1
    backend: str = "local"
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    job_name: str | None = None
    namespace: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    log_lines: int = 0
    artifacts: list[ArtifactInfo] = Field(default_factory=list)
    artifacts_note: str | None = None
    resources: Resources | None = None  # the requests and limits the attempt ran with (defaults included)
    usage: Usage | None = None  # what the attempt's script used, as its agent measured it

    @property
    def ok(self) -> bool:
        return self.status == TaskStatus.COMPLETED

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class ArtifactInfo(BaseModel):
    path: str
    size: int
    sha256: str
    location: str


RunContext.model_rebuild()
TaskResult.model_rebuild()
