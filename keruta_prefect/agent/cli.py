"""`keruta-agent`: `run` (alias `execute`) and the helpers task scripts call.

The token is read from KERUTA_API_TOKEN only (a flag would show in `ps`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from keruta_prefect.agent.runner import (
    EXIT_API_UNREACHABLE,
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_OK,
    AgentConfig,
    run_task,
)
from keruta_prefect.client import ApiError, ApiRejected, KerutaClient

DEFAULT_ARTIFACTS_DIR = "/.keruta/doc"


class UsageError(Exception):
    pass


def _env(name: str, given: str | None = None) -> str:
    value = given or os.environ.get(name)
    if not value:
        flag = {"KERUTA_TASK_ID": "--task-id ", "KERUTA_API_URL": "--api-url "}.get(name, "")
        raise UsageError(f"{flag}{'or ' if flag else ''}{name} is required")
    return value


def _float(name: str, value: str | None) -> float | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{name}={value!r}: expected a number of seconds") from None
    if number <= 0:
        raise UsageError(f"{name}={value!r}: must be greater than zero")
    return number


def _hold(text: str) -> float:
    """Seconds to hold for collection: 0 (no hold) or a positive number."""
    return 0.0 if text.strip() in ("0", "0.0") else (_float("--hold-seconds", text) or 0.0)


def _client(args: argparse.Namespace) -> KerutaClient:
    retry = _float("--api-retry-seconds", getattr(args, "api_retry_seconds", None)) or 30.0
    return KerutaClient(_env("KERUTA_API_URL", getattr(args, "api_url", None)), _env("KERUTA_API_TOKEN"),
                        retry_seconds=retry)


def cmd_run(args: argparse.Namespace) -> int:
    level = {"WARN": "WARNING"}.get(args.log_level.upper(), args.log_level.upper())
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError(f"--log-level={args.log_level!r}: allowed: DEBUG, INFO, WARNING, ERROR")
    logging.basicConfig(level=level, format="keruta-agent %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the agent's own
    config = AgentConfig(
        task_id=_env("KERUTA_TASK_ID", args.task_id),
        api_url=_env("KERUTA_API_URL", args.api_url),
        token=_env("KERUTA_API_TOKEN"),
        work_dir=Path(args.work_dir or os.environ.get("KERUTA_WORK_DIR") or "/work"),
        artifacts_dir=Path(args.artifacts_dir or os.environ.get("KERUTA_ARTIFACTS_DIR") or DEFAULT_ARTIFACTS_DIR),
        timeout=_float("--timeout", args.timeout or os.environ.get("KERUTA_TIMEOUT")),
        grace_seconds=_float("--grace", args.grace) or 2.0,
        retry_seconds=_float("--api-retry-seconds", args.api_retry_seconds
                             or os.environ.get("KERUTA_API_RETRY_SECONDS")) or 300.0,
        hold_seconds=_hold(args.hold_seconds or os.environ.get("KERUTA_HOLD_SECONDS") or "0"),
        upload=os.environ.get("KERUTA_ARTIFACTS_MODE", "") == "upload",
    )
    with KerutaClient(config.api_url, config.token, retry_seconds=config.retry_seconds) as client:
        return run_task(config, client, echo=args.echo)


def cmd_log(args: argparse.Namespace) -> int:
    level = args.level.upper()
    if level not in ("DEBUG", "INFO", "WARN", "WARNING", "ERROR"):
        raise UsageError(f"LEVEL={args.level!r}: allowed: DEBUG, INFO, WARNING, ERROR")
    with _client(args) as client:
        client.post_log(_env("KERUTA_TASK_ID"), level, " ".join(args.message))
    return EXIT_OK


def cmd_progress(args: argparse.Namespace) -> int:
    try:
        value = int(args.percent)
    except ValueError:
        value = -1
    if not 0 <= value <= 100:
        raise UsageError(f"PERCENT={args.percent!r}: expected a whole number from 0 to 100")
    with _client(args) as client:
        client.set_status(_env("KERUTA_TASK_ID"), "IN_PROGRESS", progress=value, message=args.message)
    return EXIT_OK


def _artifacts_dir() -> Path:
    return Path(os.environ.get("KERUTA_ARTIFACTS_DIR") or DEFAULT_ARTIFACTS_DIR)


def cmd_artifact_add(args: argparse.Namespace) -> int:
    source = Path(args.path)
    if not source.exists():
        raise UsageError(f"PATH={args.path!r}: no such file or directory")
    name = args.name or source.name
    if "/" in name or name in ("", ".", ".."):
        raise UsageError(f"--name={name!r}: must be a plain file name")
    target = _artifacts_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True, symlinks=True)
    else:
        shutil.copy2(source, target)
    return EXIT_OK


def cmd_artifact_list(_args: argparse.Namespace) -> int:
    root = _artifacts_dir()
    if root.is_dir():
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            print(f"{path.stat().st_size}\t{path.relative_to(root)}")
    return EXIT_OK


def cmd_artifact_remove(args: argparse.Namespace) -> int:
    root = _artifacts_dir().resolve()
    target = (root / args.path).resolve()
    if root not in target.parents:
        raise UsageError(f"PATH={args.path!r}: not inside the artifacts directory {root}")
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ok = client.health()
    print("ok" if ok else f"keruta API at {client.api_url} is not reachable")
    return EXIT_OK if ok else EXIT_API_UNREACHABLE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keruta-agent", description="Run a keruta task and report to the keruta API.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "execute"):
        run = sub.add_parser(name, help="run a task (execute is an alias)")
        run.add_argument("--task-id", help="default: $KERUTA_TASK_ID")
        run.add_argument("--api-url", help="default: $KERUTA_API_URL")
        run.add_argument("--work-dir", help="default: $KERUTA_WORK_DIR or /work")
        run.add_argument("--artifacts-dir", help=f"default: $KERUTA_ARTIFACTS_DIR or {DEFAULT_ARTIFACTS_DIR}")
        run.add_argument("--timeout", help="seconds the script may run (default: the task's, or none)")
        run.add_argument("--grace", help="seconds between SIGTERM and SIGKILL on timeout (default 2)")
        run.add_argument("--api-retry-seconds", help="how long to keep retrying the keruta API (default 300)")
        run.add_argument("--hold-seconds", help="after the final report, wait this long for the files to be "
                                                "collected (default: $KERUTA_HOLD_SECONDS or 0)")
        run.add_argument("--log-level", default=os.environ.get("KERUTA_LOG_LEVEL", "INFO"))
        run.add_argument("--echo", action="store_true", default=os.environ.get("KERUTA_ECHO", "") in ("1", "true"),
                         help="also print the script's output (default: $KERUTA_ECHO)")
        run.set_defaults(func=cmd_run)
    log = sub.add_parser("log", help="send a log line: log LEVEL MESSAGE…")
    log.add_argument("level")
    log.add_argument("message", nargs="+")
    log.set_defaults(func=cmd_log)
    progress = sub.add_parser("progress", help="report progress: progress PERCENT [--message M]")
    progress.add_argument("percent")
    progress.add_argument("--message")
    progress.set_defaults(func=cmd_progress)
    artifact = sub.add_parser("artifact", help="manage the files collected after the task")
    asub = artifact.add_subparsers(dest="artifact_command", required=True)
    add = asub.add_parser("add", help="copy a file or directory into the artifacts directory")
    add.add_argument("path")
    add.add_argument("--name")
    add.set_defaults(func=cmd_artifact_add)
    asub.add_parser("list", help="list the artifacts directory").set_defaults(func=cmd_artifact_list)
    remove = asub.add_parser("remove", help="remove a file from the artifacts directory")
    remove.add_argument("path")
    remove.set_defaults(func=cmd_artifact_remove)
    sub.add_parser("health", help="check that the keruta API answers").set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"keruta-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ApiRejected as exc:
        print(f"keruta-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ApiError as exc:
        print(f"keruta-agent: {exc}", file=sys.stderr)
        return EXIT_API_UNREACHABLE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the agent's own bug: one line, distinct exit code
        print(f"keruta-agent: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
