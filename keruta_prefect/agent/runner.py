"""What `keruta-agent run` does: report, fetch, execute, stream logs, report the outcome.

Read in this order: :func:`run_task` here (the steps), :mod:`.execute` (running the script),
:mod:`.shipper` (sending its lines to the API: batches, refusals, retries), :mod:`.spool` (where unsent lines
wait: memory up to a bound, then ``<work-dir>/.keruta/unsent-logs.jsonl``), :mod:`.batches` (the pure sizes
and messages). If the API never comes back within the retry budget, the unsent lines are left in the spool
and the agent exits ExitCode.API_UNREACHABLE; a refusal of everything exits ExitCode.CONFIG.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keruta_prefect.agent.batches import BATCH_BYTES, BATCH_LINES, MAX_LINE_BYTES, Line, batch_length, refusal_report
from keruta_prefect.agent.execute import ScriptEnd, execute, pump, script_path, write_script
from keruta_prefect.agent.shipper import LogShipper
from keruta_prefect.agent.spool import MEMORY_BYTES
from keruta_prefect.backoff import SYSTEM_CLOCK, Clock
from keruta_prefect.client import ApiError, ApiRejected, KerutaClient, SourceError
from keruta_prefect.contract import (
    COLLECTED_MARKER,
    PARAM_PREFIX,
    READY_LINE,
    SPOOL_FILE,
    Env,
    ExitCode,
    Reason,
    TaskStatus,
    exit_code_after_report,
)

__all__ = [  # the agent's steps, and the names tests and keruta_prefect.agent.cli import from here
    "BATCH_BYTES",
    "BATCH_LINES",
    "MAX_LINE_BYTES",
    "MEMORY_BYTES",
    "AgentConfig",
    "Line",
    "LogShipper",
    "batch_length",
    "hold_for_collection",
    "pump",
    "refusal_report",
    "run_task",
    "upload_artifacts",
]

log = logging.getLogger("keruta.agent")

DEFAULT_RETRY_SECONDS = 300.0  # how long the keruta API may be away before the agent gives up
DEFAULT_GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL when the script is stopped
HOLD_POLL_SECONDS = 0.1  # how often the hold for collection looks for the marker


@dataclass
class AgentConfig:
    task_id: str
    api_url: str
    token: str
    work_dir: Path
    artifacts_dir: Path
    timeout: float | None = None
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    retry_seconds: float = DEFAULT_RETRY_SECONDS
    hold_seconds: float = 0.0  # after the final report, wait this long for the files to be collected
    upload: bool = False  # push the artifacts directory to the keruta API before the final report
    debug: bool = False  # an internal error's traceback goes to stderr too
    memory_limit: int | None = None  # bytes: the script's tree is killed over it (Env.MEMORY_LIMIT)


def run_task(config: AgentConfig, client: KerutaClient, *, echo: bool = False) -> int:
    """Run one task to its end. Returns the agent's exit code."""
    task_id = config.task_id
    for name, directory in (("work directory", config.work_dir), ("artifacts directory", config.artifacts_dir)):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("%s %s: %s", name, directory, exc.strerror or exc)
            return ExitCode.CONFIG
    try:
        client.set_status(task_id, TaskStatus.IN_PROGRESS, message="keruta-agent started")
        task = client.get_task(task_id)
        script = client.get_script(task_id)
    except ApiRejected as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG
    except ApiError as exc:
        log.error("%s", exc)
        return ExitCode.API_UNREACHABLE

    spool = config.work_dir / SPOOL_FILE
    shipper = LogShipper(client, task_id, spool, debug=config.debug, retry_seconds=config.retry_seconds)
    terminated = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: terminated.set())  # kept through the hold that follows
    path = script_path(config.work_dir, str(script.get("filename") or ""))
    try:
        write_script(path, str(script.get("content") or ""))
    except OSError as exc:
        message = f"cannot write the script to {path}: {exc.strerror or exc}"
        shipper.emit("ERROR", message)
        end = ScriptEnd(TaskStatus.FAILED, Reason.SCRIPT_NOT_RUNNABLE.value, message)
    else:
        end = execute(path, cwd=config.work_dir, env=_script_env(config, script), shipper=shipper,
                      timeout=config.timeout or task.get("timeoutSeconds") or None,
                      grace_seconds=config.grace_seconds, terminated=terminated, echo=echo,
                      memory_limit=config.memory_limit)

    if config.upload and not end.terminated:
        upload_artifacts(config, client, shipper)
    spooled = shipper.close(config.retry_seconds)
    if shipper.lost:  # the API away, the spool unwritable and memory full at once: said, not hidden
        log.error("%d log lines lost: neither sent nor written to %s", shipper.lost, spool)
    exit_code = _exit_code(end)
    if shipper.refused is not None:
        # Refused for good (wrong token, task gone…): a configuration error, not an unreachable API.
        log.error("%d log lines not stored (the keruta API refused them); kept in %s", spooled, spool)
        exit_code = ExitCode.CONFIG
    elif shipper.failure is not None:
        if spooled:
            log.error("%d log lines not sent (internal error); kept in %s", spooled, spool)
        exit_code = ExitCode.INTERNAL
    elif spooled:
        log.error("%d log lines could not be sent; kept in %s", spooled, spool)
        exit_code = ExitCode.API_UNREACHABLE
    if end.status is None:
        # SIGTERM comes from a cancel, an eviction, a node drain or a deleted Job: the agent cannot tell
        # which, so it reports no final status; whoever stopped it (the flow) knows and decides. (A
        # CANCELLED here would also make an evicted task's replacement Pod fail on IN_PROGRESS.)
        return exit_code
    try:
        client.set_status(task_id, end.status, message=end.message, error_code=end.error_code, usage=end.usage)
    except ApiRejected as exc:
        if not exc.permanent:
            # e.g. the flow already marked the task CANCELLED (409): that word stands, ours is dropped.
            log.warning("final status not accepted: %s", exc)
        else:
            if not _same_refusal(exc, shipper.refused):  # each refusal is said once
                log.error("%s", exc)
            return ExitCode.CONFIG
    except ApiError as exc:
        log.error("%s", exc)
        return ExitCode.API_UNREACHABLE
    hold_for_collection(config, terminated)
    return exit_code


def _exit_code(end: ScriptEnd) -> int:
    """The exit code that says how the script ended (before what happened to its logs is taken into account)."""
    if end.status is None:
        return ExitCode.TERMINATED
    code = exit_code_after_report(end.status)
    assert code is not None, end.status  # COMPLETED and FAILED have one
    return code


def _same_refusal(exc: ApiRejected, earlier: ApiRejected | None) -> bool:
    return earlier is not None and (earlier.status, earlier.detail) == (exc.status, exc.detail)


def _script_env(config: AgentConfig, script: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        Env.TASK_ID: config.task_id,
        Env.API_URL: config.api_url,
        Env.API_TOKEN: config.token,
        Env.WORK_DIR: str(config.work_dir),
        Env.ARTIFACTS_DIR: str(config.artifacts_dir),
    })
    # Scripts call the agent's helpers (`keruta-agent progress 50`): make sure this agent is on PATH.
    bin_dir = Path(sys.executable).parent
    if (bin_dir / "keruta-agent").exists():
        env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", os.defpath)])
    parameters = script.get("parameters")
    for key, value in (parameters.items() if isinstance(parameters, dict) else ()):
        if isinstance(key, str) and key.isidentifier():
            env[f"{PARAM_PREFIX}{key.upper()}"] = str(value)
    return env


def upload_artifacts(config: AgentConfig, client: KerutaClient, shipper: LogShipper) -> None:
    """Upload mode (no pods/exec on the cluster): every regular file of the artifacts directory goes to
    POST /api/v1/tasks/{id}/artifacts. A file the API refuses (over a cap) is reported, not dropped silently;
    a refusal of everything (wrong token, task gone) or an unreachable API ends the uploads with one line."""
    root = config.artifacts_dir
    if not root.is_dir():
        return
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    pairs = [(p, p.relative_to(root).as_posix()) for p in files]
    pairs = [(p, relative) for p, relative in pairs if relative != COLLECTED_MARKER]
    for index, (path, relative) in enumerate(pairs):
        try:
            client.upload_artifact(config.task_id, path, relative)
        except (OSError, SourceError) as exc:  # this file could not be read whole (it went, shrank, is unreadable)
            shipper.emit("ERROR", f"artifact {relative} not kept: it could not be read ({exc})")
            continue
        except ApiRejected as exc:
            if not exc.permanent:
                shipper.emit("ERROR", f"artifact {relative} not kept: {exc.detail}")
                continue
            left = len(pairs) - index
            shipper.emit("ERROR", f"{left} artifacts not uploaded: {exc}")
            log.error("%d artifacts not uploaded: %s", left, exc)
            return
        except ApiError as exc:
            left = len(pairs) - index
            shipper.emit("ERROR", f"{left} artifacts not uploaded: {exc}")
            log.error("%d artifacts not uploaded: %s", left, exc)
            return


def hold_for_collection(config: AgentConfig, terminated: threading.Event, clock: Clock = SYSTEM_CLOCK) -> None:
    """Keep the container (and so its files) alive until the flow has collected them (it writes the
    marker), or the hold timeout passes — so a flow that vanished never leaves a zombie Pod."""
    if config.hold_seconds <= 0:
        return
    marker = config.artifacts_dir / COLLECTED_MARKER
    log.info("%s in %s; holding up to %gs for collection", READY_LINE, config.artifacts_dir, config.hold_seconds)
    deadline = clock.now() + config.hold_seconds
    while not marker.exists() and not terminated.is_set() and clock.now() < deadline:
        # Not terminated.wait(): SIGTERM's handler sets that event in this (the main) thread, and setting an
        # Event from a handler that interrupted a wait on it can deadlock on its lock.
        clock.wait(HOLD_POLL_SECONDS)
    if marker.exists():
        log.info("artifacts collected; exiting")
    else:
        log.warning("artifacts were not collected within %gs; exiting", config.hold_seconds)
