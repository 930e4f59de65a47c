"""The run summary of a keruta task: the result as recorded, the markdown summary and files table on the
flow run, and the `keruta.task.*` event."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from keruta_prefect.models import ArtifactInfo, Resources, Task, TaskResult, Usage
from keruta_prefect.store import Store, TaskRunRow
from keruta_prefect.validation import parse_quantity

TAIL_LINES = 20  # lines of the task's log in the summary
CELL_CHARS = 300  # longest text in one cell of the summary table


def recorded_result(store: Store, task_id: str) -> TaskResult:
    """The TaskResult of a task's last recorded run."""
    task = store.get_task(task_id)
    runs = store.runs(task_id)
    run = runs[-1] if runs else None
    files = [ArtifactInfo(path=a.path, size=a.size, sha256=a.sha256, location=a.location)
             for a in store.artifacts(task_id) if run is None or a.run_id == run.id]
    return TaskResult(
        task_id=task_id, status=task.status, attempt=run.attempt if run else 0,
        backend=run.backend if run else "none", exit_code=run.exit_code if run else None,
        reason=run.reason if run else task.error_code, message=run.message if run else task.message,
        job_name=run.job_name if run else None, namespace=run.namespace if run else None,
        started_at=_utc(run.started_at) if run else None, finished_at=_utc(run.finished_at) if run else None,
        log_lines=store.count_logs(task_id), artifacts=files, artifacts_note=run.artifacts_note if run else None,
        resources=Resources.model_validate(run.resources) if run and run.resources else None,
        usage=Usage.model_validate(run.usage) if run and run.usage else None,
    )


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def artifact_key(task_id: str) -> str:
    return ("keruta-" + re.sub(r"[^a-z0-9-]+", "-", task_id.lower())).strip("-")[:100]


def publish_summary(store: Store, task: Task, result: TaskResult) -> None:
    """A markdown summary and the artifact table on the flow run; a `keruta.task.*` event."""
    tail = [row.message for row in store.last_logs(task.id, TAIL_LINES)]
    duration = f"{result.duration_seconds:.1f}s" if result.duration_seconds is not None else "-"
    where = f"Job `{result.namespace}/{result.job_name}`" if result.namespace else f"`{result.job_name}`"
    lines = [
        f"# keruta task `{task.id}`: **{result.status}**",
        "",
        "| | |", "|---|---|",
        f"| title | {_cell(task.title)} |",
        f"| status | {result.status} |",
        f"| reason | {_cell(result.reason or '-')} |",
        f"| message | {_cell(result.message or '-')} |",
        f"| exit code | {result.exit_code if result.exit_code is not None else '-'} |",
        f"| backend | {result.backend} ({where}), attempt {result.attempt} |",
        f"| duration | {duration} |",
        f"| log lines | {result.log_lines} |",
        *usage_rows(result),
        f"| artifacts | {len(result.artifacts)} files, {sum(a.size for a in result.artifacts)} bytes"
        + (f" — {_cell(result.artifacts_note)}" if result.artifacts_note else "") + " |",
        *attempts_section(store.runs(task.id)),
        "",
        "## Log tail",
        "```",
        *[line.replace("```", "'''") for line in tail],
        "```",
    ]
    key = artifact_key(task.id)
    create_markdown_artifact("\n".join(lines), key=key, description=f"keruta task {task.id}")
    if result.artifacts:
        create_table_artifact([a.model_dump() for a in result.artifacts], key=f"{key}-files"[:100],
                              description=f"files collected from keruta task {task.id}")
    emit_event(
        event=f"keruta.task.{result.status.value.lower()}",
        resource={"prefect.resource.id": f"keruta.task.{task.id}", "prefect.resource.name": task.title or task.id,
                  "keruta.task.id": task.id},
        payload={"status": result.status.value, "reason": result.reason, "exit_code": result.exit_code,
                 "message": result.message, "attempt": result.attempt, **usage_payload(result)},
    )


def usage_payload(result: TaskResult) -> dict[str, Any]:
    """What the attempt used and the requests and limits it ran with, for the event (snake_case, as in
    TaskResult's JSON; None when not measured or not known)."""
    return {"usage": result.usage.model_dump(mode="json", exclude_none=True) if result.usage else None,
            "resources": result.resources.model_dump(mode="json", exclude_none=True) if result.resources else None}


def usage_rows(result: TaskResult) -> list[str]:
    """The summary's rows of what the attempt used against what it asked for: CPU (seconds, and the
    average in cores against the CPU request and limit), peak memory against the memory request and limit,
    wall time, bytes of output. One row saying so when the agent measured nothing (killed by the kernel,
    an older agent)."""
    usage, given = result.usage, result.resources or Resources()
    if usage is None:
        return ["| used | not measured (the agent reported no usage) |"]
    rows = []
    if usage.cpu_seconds is not None:
        cores = usage.cpu_seconds / usage.wall_seconds if usage.wall_seconds else None
        average = f", {cores:.2f} cores on average" if cores is not None else ""
        rows.append(f"| CPU used | {usage.cpu_seconds:.2f}s{average}"
                    f"{_against(cores, given.cpu_request, given.cpu_limit)} |")
    if usage.peak_memory_bytes is not None:
        rows.append(f"| peak memory | {_mib(usage.peak_memory_bytes)}"
                    f"{_against(usage.peak_memory_bytes, given.memory_request, given.memory_limit)} |")
    if usage.wall_seconds is not None:
        rows.append(f"| wall time | {usage.wall_seconds:.1f}s |")
    if usage.log_bytes is not None:
        rows.append(f"| output | {usage.log_bytes} bytes |")
    return rows + ([f"| measured by | {usage.source} |"] if usage.source else [])


def _against(used: float | None, request: str | None, limit: str | None) -> str:
    """" — request 256Mi (83 %), limit 512Mi (41 %)": ``used`` in the quantities' unit (bytes, cores)."""
    parts = []
    for name, quantity in (("request", request), ("limit", limit)):
        if quantity:
            share = ""
            if used is not None:
                try:
                    share = f" ({100 * used / parse_quantity(quantity):.0f} %)"
                except (ValueError, ZeroDivisionError):
                    share = ""
            parts.append(f"{name} {quantity}{share}")
    return f" — {', '.join(parts)}" if parts else " — no request or limit"


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def attempts_section(runs: Sequence[TaskRunRow]) -> list[str]:
    """A task that took more than one attempt: a table of them, with what each changed from the one before
    (the retry policy gave it more memory or a longer timeout); nothing for a single attempt."""
    if len(runs) < 2:
        return []
    lines = ["", "## Attempts", "", "| attempt | ended | reason | memory request / limit | timeout | changed |",
             "|---|---|---|---|---|---|"]
    for before, run in zip([None, *runs], runs, strict=False):
        own = run.resources or {}
        memory = f"{own.get('memoryRequest') or '-'} / {own.get('memoryLimit') or '-'}"
        changed = _changes(before, run) if before else "-"
        lines.append(f"| {run.attempt} | {run.status} | {_cell(run.reason or '-')} | {memory} | "
                     f"{_seconds(run.timeout_seconds)} | {changed} |")
    return lines


def _changes(before: TaskRunRow, run: TaskRunRow) -> str:
    was, now = before.resources or {}, run.resources or {}
    changed = [f"{name} {was.get(key) or '-'} → {now.get(key) or '-'}"
               for key, name in (("memoryLimit", "memory limit"), ("memoryRequest", "memory request"),
                                 ("cpuLimit", "CPU limit"), ("cpuRequest", "CPU request"))
               if was.get(key) != now.get(key)]
    if before.timeout_seconds != run.timeout_seconds:
        changed.append(f"timeout {_seconds(before.timeout_seconds)} → {_seconds(run.timeout_seconds)}")
    return "; ".join(changed) or "nothing"


def _seconds(value: int | None) -> str:
    return f"{value}s" if value else "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:CELL_CHARS]


def publish_unrecorded(result: TaskResult) -> str:
    """The database did not take ``result``: keep it in Prefect, as a markdown artifact with its JSON;
    the artifact's key."""
    key = f"{artifact_key(result.task_id)}-unrecorded"
    create_markdown_artifact(f"# Not recorded: keruta task `{result.task_id}`\n\nkeruta task {result.task_id} ended "
                             f"{result.status} but the database did not take the result.\n\n```json\n"
                             f"{result.model_dump_json(indent=2)}\n```\n", key=key,
                             description=f"the outcome of keruta task {result.task_id}, not in the database")
    return key
