"""`keruta-agent`: `run` (alias `execute`) and the helpers task scripts call.

The token is read from KERUTA_API_TOKEN only (a flag would show in `ps`). Every failure is one line on
stderr: bad input (a flag, an environment variable, a path) names the field and the value and exits 2
(exit 2), as does a refusal by the keruta API; an unreachable API exits 3; anything unexpected is the
agent's own bug: one line, exit 4, and `--debug` or KERUTA_DEBUG=1 add the traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from keruta_prefect.agent.batches import BATCH_BYTES, BATCH_LINES, Line, batch_length, split_message
from keruta_prefect.agent.runner import DEFAULT_GRACE_SECONDS, DEFAULT_RETRY_SECONDS, AgentConfig, run_task
from keruta_prefect.client import ApiError, ApiRejected, KerutaClient, api_origin
from keruta_prefect.contract import (
    AGENT_LOG_PREFIX,
    DEFAULT_ARTIFACTS_DIR,
    DEFAULT_WORK_DIR,
    SIGNAL_BASE,
    ArtifactsMode,
    Env,
    ExitCode,
    TaskStatus,
)
from keruta_prefect.errors import PermanentError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ARTIFACT_MODES = tuple(ArtifactsMode)
HELPER_RETRY_SECONDS = 30.0  # how long the helpers scripts call (log, progress, health) retry the API
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


class UsageError(PermanentError):
    """Bad input: the message names the field and the value."""


# --- reading and checking input (each raises UsageError naming the field and the value) --------------------

def _given(args: argparse.Namespace, attr: str, flag: str, env: str | None) -> tuple[str, str | None]:
    """(the name the value came by, the value): a flag wins over its environment variable."""
    value = getattr(args, attr, None)
    if value is not None or env is None:
        return flag, value
    return env, os.environ.get(env)


def _required(args: argparse.Namespace, attr: str, flag: str, env: str) -> tuple[str, str]:
    name, value = _given(args, attr, flag, env)
    if not value:
        raise UsageError(f"{flag} or {env} is required" if hasattr(args, attr) else f"{env} is required")
    return name, value


def parse_seconds(name: str, value: str | None, *, zero: bool = False) -> float | None:
    """A number of seconds; None if not given. ``zero``: 0 is allowed (it means "none")."""
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{name}={value!r}: expected a number of seconds") from None
    if not math.isfinite(number):
        raise UsageError(f"{name}={value!r}: expected a finite number of seconds")
    if number < 0 or (number == 0 and not zero):
        raise UsageError(f"{name}={value!r}: must be {'zero or more' if zero else 'greater than zero'}")
    return number


def parse_bytes(name: str, value: str | None) -> int | None:
    """A positive whole number of bytes; None if not given."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if not text.isdigit() or int(text) <= 0:
        raise UsageError(f"{name}={value!r}: expected a whole number of bytes greater than zero")
    return int(text)


def parse_flag(name: str, value: str | None) -> bool:
    text = (value or "").strip().lower()
    if text not in _TRUE + _FALSE:
        raise UsageError(f"{name}={value!r}: expected 1/true/yes/on or 0/false/no/off")
    return text in _TRUE


def parse_api_url(name: str, value: str | None) -> str:
    if not value:
        raise UsageError(f"{name} is required")
    try:
        api_origin(value)
    except ValueError:
        raise UsageError(f"{name}={value!r}: expected an http:// or https:// URL of the keruta API") from None
    return value


def parse_task_id(name: str, value: str | None) -> str:
    if not value:
        raise UsageError(f"{name} is required")
    from keruta_prefect.validation import check_task_id  # not models: its pydantic classes cost ~0.2 s

    try:
        return check_task_id(value)
    except ValueError as exc:
        raise UsageError(f"{name}={value!r}: {exc}") from None


def read_token() -> str:
    """KERUTA_API_TOKEN, surrounding whitespace removed (a Secret made from a file often ends in a newline).
    Its value is never printed."""
    token = (os.environ.get(Env.API_TOKEN) or "").strip()
    if not token:
        raise UsageError(f"{Env.API_TOKEN} is required")
    bad = next((i for i, c in enumerate(token) if not ("!" <= c <= "~")), None)
    if bad is not None:
        raise UsageError(f"{Env.API_TOKEN}: character {bad + 1} is whitespace, a control character or not "
                         "ASCII; a token is printable ASCII (value not shown)")
    return token


def check_directory(name: str, path: Path, *, create: bool) -> Path:
    """A directory the agent can use: created if ``create`` and missing; never a file."""
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.is_dir():
            raise UsageError(f"{name}={str(path)!r}: not a directory")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            raise UsageError(f"{name}={str(path)!r}: not readable and writable by this user")
    except OSError as exc:
        raise UsageError(f"{name}={str(path)!r}: {exc.strerror or exc}") from None
    return path


def _client(args: argparse.Namespace) -> KerutaClient:
    return KerutaClient(parse_api_url(*_required(args, "api_url", "--api-url", Env.API_URL)), read_token(),
                        retry_seconds=HELPER_RETRY_SECONDS)


def _helper_task_id() -> str:
    # Set by `keruta-agent run`, which checked it; the client quotes it in URLs whatever it holds.
    value = os.environ.get(Env.TASK_ID)
    if not value:
        raise UsageError(f"{Env.TASK_ID} is required")
    return value


def _artifacts_dir(*, create: bool = False) -> Path:
    value = os.environ.get(Env.ARTIFACTS_DIR) or DEFAULT_ARTIFACTS_DIR
    return check_directory(Env.ARTIFACTS_DIR, Path(value), create=create)


# --- commands -------------------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    name, value = _given(args, "log_level", "--log-level", Env.LOG_LEVEL)
    level = {"WARN": "WARNING"}.get((value or "INFO").upper(), (value or "INFO").upper())
    if level not in LEVELS:
        raise UsageError(f"{name}={value!r}: allowed: {', '.join(LEVELS)}")
    echo = args.echo or parse_flag(Env.ECHO, os.environ.get(Env.ECHO))
    mode = os.environ.get(Env.ARTIFACTS_MODE) or ""
    if mode and mode not in ARTIFACT_MODES:
        raise UsageError(f"{Env.ARTIFACTS_MODE}={mode!r}: allowed: {', '.join(ARTIFACT_MODES)}")
    work_name, work = _given(args, "work_dir", "--work-dir", Env.WORK_DIR)
    artifacts_name, artifacts = _given(args, "artifacts_dir", "--artifacts-dir", Env.ARTIFACTS_DIR)
    retry = parse_seconds(*_given(args, "api_retry_seconds", "--api-retry-seconds", Env.API_RETRY_SECONDS))
    config = AgentConfig(
        task_id=parse_task_id(*_required(args, "task_id", "--task-id", Env.TASK_ID)),
        api_url=parse_api_url(*_required(args, "api_url", "--api-url", Env.API_URL)),
        token=read_token(),
        work_dir=Path(work or DEFAULT_WORK_DIR),
        artifacts_dir=Path(artifacts or DEFAULT_ARTIFACTS_DIR),
        timeout=parse_seconds(*_given(args, "timeout", "--timeout", Env.TIMEOUT)),
        grace_seconds=parse_seconds("--grace", args.grace) or DEFAULT_GRACE_SECONDS,
        retry_seconds=retry or DEFAULT_RETRY_SECONDS,
        hold_seconds=parse_seconds(*_given(args, "hold_seconds", "--hold-seconds", Env.HOLD_SECONDS),
                                   zero=True) or 0.0,
        upload=mode == ArtifactsMode.UPLOAD,
        debug=args.debug,
        memory_limit=parse_bytes(Env.MEMORY_LIMIT, os.environ.get(Env.MEMORY_LIMIT)),
    )
    check_directory(work_name if work else "--work-dir", config.work_dir, create=True)
    check_directory(artifacts_name if artifacts else "--artifacts-dir", config.artifacts_dir, create=True)
    logging.basicConfig(level=level, format=f"{AGENT_LOG_PREFIX}%(levelname)s %(message)s", stream=sys.stderr)
    with KerutaClient(config.api_url, config.token, retry_seconds=config.retry_seconds) as client:
        return run_task(config, client, echo=echo)


def cmd_log(args: argparse.Namespace) -> int:
    level = args.level.upper()  # stored as given: WARN stays WARN
    if level not in (*LEVELS, "WARN"):
        raise UsageError(f"LEVEL={args.level!r}: allowed: {', '.join(LEVELS)}")
    task_id = _helper_task_id()
    lines = [Line.of({"seq": seq, "level": level, "message": piece})
             for seq, piece in enumerate(split_message(" ".join(args.message)))]
    # Numbered lines under a source of its own: a batch sent again after a lost answer is stored once.
    source = f"log-{os.urandom(8).hex()}"
    with _client(args) as client:
        while lines:
            count = batch_length(lines, BATCH_LINES, BATCH_BYTES)
            client.post_logs(task_id, source, [line.item for line in lines[:count]])
            del lines[:count]
    return ExitCode.OK


def _text(value: str) -> str:
    """An argument as valid text: bytes that are not UTF-8 (kept by Python as surrogates) become U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def cmd_progress(args: argparse.Namespace) -> int:
    try:
        value = int(args.percent)
    except ValueError:
        value = -1
    if not 0 <= value <= 100:
        raise UsageError(f"PERCENT={args.percent!r}: expected a whole number from 0 to 100")
    task_id = _helper_task_id()
    with _client(args) as client:
        message = _text(args.message) if args.message is not None else None
        client.set_status(task_id, TaskStatus.IN_PROGRESS, progress=value, message=message)
    return ExitCode.OK


def cmd_artifact_add(args: argparse.Namespace) -> int:
    import shutil  # here, not for every agent: it loads the compression modules

    source = Path(args.path)
    if not source.exists():
        raise UsageError(f"PATH={args.path!r}: no such file or directory")
    name = args.name or source.name
    if "/" in name or name in ("", ".", ".."):
        raise UsageError(f"--name={name!r}: must be a plain file name")
    target = _artifacts_dir(create=True) / name
    try:
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True, symlinks=True)
        else:
            shutil.copy2(source, target)
    except (OSError, shutil.Error) as exc:
        raise UsageError(f"PATH={args.path!r}: cannot copy to {str(target)!r}: {_why(exc)}") from None
    return ExitCode.OK


def _why(exc: BaseException) -> str:
    import shutil

    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        first = exc.args[0][0]
        return f"{len(exc.args[0])} files failed, first {first[0]!r}: {first[-1]}"
    return str(getattr(exc, "strerror", None) or exc)


def cmd_artifact_list(_args: argparse.Namespace) -> int:
    root = _artifacts_dir()
    if root.is_dir():
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            print(f"{path.stat().st_size}\t{path.relative_to(root)}")
    return ExitCode.OK


def cmd_artifact_remove(args: argparse.Namespace) -> int:
    import shutil

    root = _artifacts_dir().resolve()
    target = (root / args.path).resolve()
    if root not in target.parents:
        raise UsageError(f"PATH={args.path!r}: not inside the artifacts directory {root}")
    try:
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    except OSError as exc:
        raise UsageError(f"PATH={args.path!r}: cannot remove: {exc.strerror or exc}") from None
    return ExitCode.OK


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            client.health()
        except ApiRejected:
            raise  # something answers, but not a keruta API: the URL is wrong (exit 2)
        except ApiError as exc:
            _say(f"keruta API at {client.api_url} is not reachable: {exc}")
            return ExitCode.API_UNREACHABLE
    print("ok")
    return ExitCode.OK


# --- the command line -----------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2) like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.CONFIG, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the subcommand; SUPPRESS keeps a subcommand from resetting it.
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=f"print the traceback of an internal error (also: {Env.DEBUG}=1)")
    parser = _Parser(prog="keruta-agent", description="Run a keruta task and report to the keruta API.",
                     parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "execute"):
        run = sub.add_parser(name, help="run a task (execute is an alias)", parents=[debug])
        run.add_argument("--task-id", help=f"default: ${Env.TASK_ID}")
        run.add_argument("--api-url", help=f"default: ${Env.API_URL}")
        run.add_argument("--work-dir", help=f"default: ${Env.WORK_DIR} or {DEFAULT_WORK_DIR}")
        run.add_argument("--artifacts-dir", help=f"default: ${Env.ARTIFACTS_DIR} or {DEFAULT_ARTIFACTS_DIR}")
        run.add_argument("--timeout", help=f"seconds the script may run (default: ${Env.TIMEOUT}, the task's, "
                                           "or none)")
        run.add_argument("--grace", help=f"seconds between SIGTERM and SIGKILL on timeout (default "
                                         f"{DEFAULT_GRACE_SECONDS:g})")
        run.add_argument("--api-retry-seconds", help="how long to keep retrying the keruta API (default: "
                                                     f"${Env.API_RETRY_SECONDS} or {DEFAULT_RETRY_SECONDS:g})")
        run.add_argument("--hold-seconds", help="after the final report, wait this long for the files to be "
                                                f"collected (default: ${Env.HOLD_SECONDS} or 0)")
        run.add_argument("--log-level", help=f"DEBUG, INFO, WARNING or ERROR (default: ${Env.LOG_LEVEL} or INFO)")
        run.add_argument("--echo", action="store_true", help=f"also print the script's output (default: ${Env.ECHO})")
        run.set_defaults(func=cmd_run)
    log = sub.add_parser("log", help="send a log line: log LEVEL MESSAGE…", parents=[debug])
    log.add_argument("level")
    log.add_argument("message", nargs="+")
    log.set_defaults(func=cmd_log)
    progress = sub.add_parser("progress", help="report progress: progress PERCENT [--message M]", parents=[debug])
    progress.add_argument("percent")
    progress.add_argument("--message")
    progress.set_defaults(func=cmd_progress)
    artifact = sub.add_parser("artifact", help="manage the files collected after the task", parents=[debug])
    asub = artifact.add_subparsers(dest="artifact_command", required=True)
    add = asub.add_parser("add", help="copy a file or directory into the artifacts directory", parents=[debug])
    add.add_argument("path")
    add.add_argument("--name")
    add.set_defaults(func=cmd_artifact_add)
    listing = asub.add_parser("list", help="list the artifacts directory", parents=[debug])
    listing.set_defaults(func=cmd_artifact_list)
    remove = asub.add_parser("remove", help="remove a file from the artifacts directory", parents=[debug])
    remove.add_argument("path")
    remove.set_defaults(func=cmd_artifact_remove)
    health = sub.add_parser("health", help="check that the keruta API answers", parents=[debug])
    health.set_defaults(func=cmd_health)
    return parser


def _say(message: object) -> None:
    """One line on stderr, whatever the message holds (an API's answer may carry newlines)."""
    print("keruta-agent: " + " ".join(str(message).split()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        debug = parse_flag(Env.DEBUG, os.environ.get(Env.DEBUG))
    except UsageError as exc:
        _say(exc)
        return ExitCode.CONFIG
    args = build_parser().parse_args(argv)
    args.debug = debug = bool(getattr(args, "debug", False)) or debug
    try:
        return int(args.func(args))
    except UsageError as exc:
        _say(exc)
        return ExitCode.CONFIG
    except ApiRejected as exc:  # the API refuses (wrong token, unknown task, not a keruta API): permanent
        _say(exc)
        return ExitCode.CONFIG
    except ApiError as exc:
        _say(exc)
        return ExitCode.API_UNREACHABLE
    except KeyboardInterrupt:
        return SIGNAL_BASE + signal.SIGINT  # 130, as a shell says it
    except Exception as exc:  # the agent's own bug: one line, distinct exit code
        if debug:
            traceback.print_exc()
            hint = ""
        else:
            hint = f" (run with --debug or {Env.DEBUG}=1 for the traceback)"
        _say(f"internal error: {type(exc).__name__}: {exc}{hint}")
        return ExitCode.INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
