"""Commands that run and list tasks: run, tasks list/logs/add/usage, dispatch, pipeline."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keruta_prefect.cli.options import (
    EXIT_OK,
    EXIT_TASK_FAILED,
    UsageError,
    at_least_one,
    block_option,
    check_stored_settings,
    in_range,
    limit_option,
    print_runs,
    settings_from,
    task_file,
)
from keruta_prefect.contract import TaskStatus
from keruta_prefect.models import TaskSpecError
from keruta_prefect.settings import SettingsError
from keruta_prefect.validation import parse_byte_size, single_line


def cmd_run(args: argparse.Namespace) -> int:
    spec = task_file(args.task_file)  # fail fast, before Prefect starts
    block_option("--settings-block", args.settings_block)
    if args.properties:
        settings_from(args.properties)
        os.environ["KERUTA_PROPERTIES"] = str(Path(args.properties).resolve())
    check_stored_settings(args.settings_block, args.properties, backend=args.backend)

    from keruta_prefect.flows import KerutaTaskFailed, keruta_task

    print(f"running keruta task {spec.id} ({spec.title or 'untitled'}) on the {args.backend} backend…",
          file=sys.stderr)
    state = keruta_task(task_spec=spec.model_dump(mode="json", by_alias=True), backend=args.backend,
                        settings_block=args.settings_block, return_state=True)
    try:
        result = state.result()
    except KerutaTaskFailed as exc:
        result = exc.result
    except (SettingsError, TaskSpecError):
        raise  # bad input found inside the flow: exit 2, one line
    except Exception as exc:
        print(f"keruta-prefect: the flow failed: {single_line(str(exc)) or type(exc).__name__}", file=sys.stderr)
        return EXIT_TASK_FAILED
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        code = f" exit code {result.exit_code}" if result.exit_code is not None else ""
        why = f" — {result.reason}: {result.message}" if result.status != TaskStatus.COMPLETED else ""
        duration = f", {result.duration_seconds:.1f}s" if result.duration_seconds is not None else ""
        print(f"{result.status} task {result.task_id} (attempt {result.attempt},{code}{duration}, "
              f"{result.log_lines} log lines, {len(result.artifacts)} artifacts){why}")
        if result.artifacts_note:
            print(f"artifacts: {result.artifacts_note}")
    return EXIT_OK if result.status == TaskStatus.COMPLETED else EXIT_TASK_FAILED


def cmd_tasks_logs(args: argparse.Namespace) -> int:
    from keruta_prefect.store import get_store

    store = get_store()
    store.get_task(args.task_id)
    rows = store.logs(args.task_id)
    if args.json:
        print(json.dumps([{"ts": r.ts.isoformat(), "source": r.source, "seq": r.seq, "level": r.level,
                           "message": r.message} for r in rows], indent=2))
    else:
        for row in rows:
            print(f"{row.ts.isoformat()} {row.level:5} {row.message}")
    return EXIT_OK


def cmd_tasks_add(args: argparse.Namespace) -> int:
    """Store a task as PENDING: keruta-dispatch picks it up (highest priority first)."""
    from keruta_prefect.store import TaskExists, get_store

    task = task_file(args.task_file)
    try:
        stored = get_store().create_task(task)
    except TaskExists as exc:
        raise UsageError(f"{exc} (id={task.id!r}; give another id, or none for a fresh one)") from None
    if args.json:
        print(stored.model_dump_json(by_alias=True, indent=2))
    else:
        print(f"{stored.id}\t{stored.status}\tpriority {stored.priority}\t{stored.title}")
    return EXIT_OK


def cmd_tasks_list(args: argparse.Namespace) -> int:
    from keruta_prefect.models import TaskStatus
    from keruta_prefect.store import get_store

    status = None
    if args.status:
        try:
            status = TaskStatus(args.status.upper())
        except ValueError:
            raise UsageError(f"--status={args.status!r}: allowed: {', '.join(TaskStatus)}") from None
    in_range("--limit", args.limit, 1, 100000)
    tasks = get_store().list_tasks(status, limit=args.limit)
    if args.json:
        print(json.dumps([t.model_dump(mode="json", by_alias=True) for t in tasks], indent=2))
    else:
        for t in tasks:
            print(f"{t.id}\t{t.status}\t{t.priority}\t{t.title}")
    return EXIT_OK


# `tasks usage`: a task's peak memory is flagged LOW under this share of its memory request (of its limit when it
# has no request: it asks for more than it uses) and HIGH over this share of its memory limit (of its request
# when it has no limit: it is close to being OOMKilled).
LOW_SHARE, HIGH_SHARE = 0.25, 0.90
_DURATION = re.compile(r"^(?P<amount>[0-9]+(\.[0-9]+)?)(?P<unit>[smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(value: str, now: datetime) -> datetime:
    """--since: a duration back from ``now`` (90s, 30m, 12h, 7d, 2w) or an ISO date or date-time (UTC unless
    it says otherwise). UsageError naming the value."""
    text = value.strip()
    match = _DURATION.match(text)
    if match:
        return now - timedelta(seconds=float(match["amount"]) * _UNITS[match["unit"]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since={value!r}: expected a duration (90s, 30m, 12h, 7d, 2w) or an ISO date or "
                         "date-time (2026-01-31, 2026-01-31T12:00:00Z)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def memory_flag(peak: int | None, request: str | None, limit: str | None) -> str | None:
    """"LOW" (peak under LOW_SHARE of the request, else of the limit), "HIGH" (over HIGH_SHARE of the limit,
    else of the request), or None (fits, or nothing to compare)."""
    if peak is None:
        return None
    low_base, high_base = request or limit, limit or request
    if high_base and peak > HIGH_SHARE * parse_byte_size(high_base):
        return "HIGH"
    if low_base and peak < LOW_SHARE * parse_byte_size(low_base):
        return "LOW"
    return None


def usage_row(run: Any) -> dict[str, Any]:
    """One task's last run in `tasks usage --json` (snake_case, as TaskResult's JSON)."""
    from keruta_prefect.models import Resources, Usage

    usage = Usage.model_validate(run.usage) if run.usage else None
    given = Resources.model_validate(run.resources) if run.resources else Resources()
    peak = usage.peak_memory_bytes if usage else None
    return {"task_id": run.task_id, "status": run.status, "attempt": run.attempt, "backend": run.backend,
            "finished_at": run.finished_at.replace(tzinfo=run.finished_at.tzinfo or UTC).isoformat(),
            "usage": usage.model_dump(mode="json", exclude_none=True) if usage else None,
            "resources": given.model_dump(mode="json", exclude_none=True),
            "flag": memory_flag(peak, given.memory_request, given.memory_limit)}


def cmd_tasks_usage(args: argparse.Namespace) -> int:
    """Each task's last finished run: what it used against its requests and limits, with the memory flags."""
    from keruta_prefect.store import get_store

    since = parse_since(args.since, datetime.now(UTC)) if args.since is not None else None
    in_range("--limit", args.limit, 1, 100000)
    rows = [usage_row(run) for run in get_store().last_runs(since, limit=args.limit)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print("\t".join(("TASK", "STATUS", "ATTEMPT", "CPU_S", "WALL_S", "PEAK_MIB", "MEM_REQUEST", "MEM_LIMIT", "FLAG")))
    for row in rows:
        usage, given = row["usage"] or {}, row["resources"]
        peak = usage.get("peak_memory_bytes")
        print("\t".join(str(cell) for cell in (
            row["task_id"], row["status"], row["attempt"], _number(usage.get("cpu_seconds"), ".2f"),
            _number(usage.get("wall_seconds"), ".1f"), _number(peak / 2**20 if peak is not None else None, ".1f"),
            given.get("memory_request", "-"), given.get("memory_limit", "-"), row["flag"] or "-")))
    return EXIT_OK


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cmd_dispatch(args: argparse.Namespace) -> int:
    """One pass of keruta-dispatch in this process (the deployment runs it on a schedule)."""
    at_least_one(max_tasks=args.max_tasks, concurrency=args.concurrency)
    limit = limit_option(args.concurrency_limit)
    check_stored_settings(args.settings_block, backend=args.backend)
    from keruta_prefect.pipelines import keruta_dispatch

    print(f"dispatching up to {args.max_tasks} PENDING tasks on the {args.backend} backend…", file=sys.stderr)
    result = keruta_dispatch(max_tasks=args.max_tasks, concurrency=args.concurrency, backend=args.backend,
                             settings_block=args.settings_block, concurrency_limit=limit)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print_runs(result.runs)
        print(f"{len(result.claimed)} tasks dispatched")
    return EXIT_OK if all(r.status == TaskStatus.COMPLETED for r in result.runs) else EXIT_TASK_FAILED


def cmd_pipeline(args: argparse.Namespace) -> int:
    """A pipeline file: {"parent": {...} | "id" | null, "children": [...]} through keruta-pipeline."""
    from keruta_prefect.pipelines import PipelineFailed, check_pipeline, keruta_pipeline

    at_least_one(concurrency=args.concurrency)
    limit = limit_option(args.concurrency_limit)
    path = Path(args.file)
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"--file={args.file!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"--file={args.file!r}: not JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"parent", "children"}:
        raise TaskSpecError(f"{args.file}: expected an object with 'parent' and/or 'children'")
    children = data.get("children") or []
    if not isinstance(children, list):
        raise TaskSpecError(f"{args.file}: children={str(children)[:60]!r}: expected a list of task specs or ids")
    check_pipeline(data.get("parent"), children)  # fail fast, before Prefect starts
    check_stored_settings(args.settings_block, backend=args.backend)
    print(f"running a pipeline of {len(children) + (1 if data.get('parent') else 0)} tasks, "
          f"{args.concurrency} at a time, on the {args.backend} backend…", file=sys.stderr)
    state = keruta_pipeline(parent=data.get("parent"), children=children, concurrency=args.concurrency,
                            backend=args.backend, settings_block=args.settings_block,
                            concurrency_limit=limit, return_state=True)
    try:
        result = state.result()
    except PipelineFailed as exc:
        result = exc.result
    except (SettingsError, TaskSpecError):
        raise
    except Exception as exc:
        raise UsageError(single_line(str(exc)) or type(exc).__name__) from None
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print_runs(result.runs)
        print(result.summary())
    return EXIT_OK if result.completed else EXIT_TASK_FAILED
