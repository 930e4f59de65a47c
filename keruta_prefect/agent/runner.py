"""What `keruta-agent run` does: report, fetch, execute, stream logs, report the outcome.

Nothing the script prints is lost: lines are numbered per agent session and shipped in order in
batches; a batch whose answer was lost is sent again and the API stores each (session, number) once.
While the API is down the lines wait in memory; if it never comes back within the retry budget they
are written to ``<work-dir>/.keruta/unsent-logs.jsonl`` and the agent exits with EXIT_API_UNREACHABLE.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from keruta_prefect.client import ApiError, ApiRejected, KerutaClient

log = logging.getLogger("keruta.agent")

# Exit codes (documented in the README). EXIT_CONFIG is permanent: a Job's podFailurePolicy fails
# the Job at once on it; EXIT_API_UNREACHABLE is transient: the flow may try the task again.
EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_CONFIG = 2
EXIT_API_UNREACHABLE = 3
EXIT_INTERNAL = 4
EXIT_TERMINATED = 143

MAX_LINE_BYTES = 16 * 1024  # longer lines are sent in pieces of this size
BATCH_LINES = 2000
BATCH_SECONDS = 0.2


@dataclass
class AgentConfig:
    task_id: str
    api_url: str
    token: str
    work_dir: Path
    artifacts_dir: Path
    timeout: float | None = None
    grace_seconds: float = 2.0
    retry_seconds: float = 300.0
    hold_seconds: float = 0.0  # after the final report, wait this long for the files to be collected
    upload: bool = False  # push the artifacts directory to the keruta API before the final report


class LogShipper:
    """Numbers lines and sends them in ordered batches from a background thread."""

    def __init__(self, client: KerutaClient, task_id: str) -> None:
        self.client = client
        self.task_id = task_id
        self.source = f"agent-{uuid.uuid4().hex[:16]}"
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._closing = threading.Event()
        self._close_deadline = 0.0
        self._thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)
        self._thread.start()

    def emit(self, level: str, message: str) -> None:
        with self._seq_lock:
            seq = self._seq
            self._seq += 1
        self._queue.put({"seq": seq, "level": level, "message": message, "ts": time.time()})

    def _drain(self, block_for: float) -> bool:
        """Move queued lines to pending; False once the close sentinel was seen and all is drained."""
        try:
            item = self._queue.get(timeout=block_for)
        except queue.Empty:
            return True
        open_ = True
        while True:
            if item is None:
                open_ = False
            else:
                self._pending.append(item)
            if len(self._pending) >= BATCH_LINES * 4:
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        return open_

    def _run(self) -> None:
        open_ = True
        backoff = 0.1
        while open_ or self._pending:
            if open_:
                # Lines that arrive while a batch is in flight form the next batch.
                open_ = self._drain(0.0 if self._pending else BATCH_SECONDS)
            if not self._pending:
                continue
            batch = self._pending[:BATCH_LINES]
            closing = self._closing.is_set()
            try:
                # While the script runs: one attempt per round, so new lines keep being collected;
                # at close: whatever is left of the retry budget.
                budget = max(0.0, self._close_deadline - time.monotonic()) if closing else 0.0
                self.client.post_logs(self.task_id, self.source, batch, retry_seconds=budget)
            except ApiRejected as exc:
                log.error("keruta API rejected log lines: %s", exc)
                return
            except ApiError:
                if closing and time.monotonic() >= self._close_deadline:
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            del self._pending[: len(batch)]

    def close(self, timeout: float) -> list[dict[str, Any]]:
        """Flush everything; returns the lines that could not be delivered (empty on success)."""
        self._close_deadline = time.monotonic() + timeout
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout + 5)
        leftover = list(self._pending)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                leftover.append(item)
        return leftover


def _lines(stream: IO[bytes]) -> Iterator[str]:
    """Decoded lines of a byte stream: UTF-8 decoded incrementally (invalid bytes → U+FFFD), lines
    longer than MAX_LINE_BYTES split into pieces, the final unterminated line included."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    partial = ""
    while True:
        chunk = stream.readline(MAX_LINE_BYTES)
        if not chunk:
            tail = partial + decoder.decode(b"", final=True)
            if tail:
                yield tail.rstrip("\r")
            return
        text = decoder.decode(chunk)
        if chunk.endswith(b"\n"):
            yield (partial + text)[:-1].rstrip("\r")
            partial = ""
        else:
            partial += text
            if len(partial.encode("utf-8", "surrogatepass")) >= MAX_LINE_BYTES:
                yield partial
                partial = ""


def _pump(stream: IO[bytes], level: str, shipper: LogShipper, echo: bool) -> None:
    for line in _lines(stream):
        shipper.emit(level, line)
        if echo:
            print(line, flush=True)


def run_task(config: AgentConfig, client: KerutaClient, *, echo: bool = False) -> int:
    """Run one task to its end. Returns the agent's exit code."""
    task_id = config.task_id
    try:
        client.set_status(task_id, "IN_PROGRESS", message="keruta-agent started")
        task = client.get_task(task_id)
        script = client.get_script(task_id)
    except ApiRejected as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    except ApiError as exc:
        log.error("%s", exc)
        return EXIT_API_UNREACHABLE

    config.work_dir.mkdir(parents=True, exist_ok=True)
    config.artifacts_dir.mkdir(parents=True, exist_ok=True)
    filename = os.path.basename(script.get("filename") or "script.sh") or "script.sh"
    path = config.work_dir / filename
    content = script.get("content") or ""
    path.write_bytes(content.encode("utf-8"))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IRUSR)

    env = dict(os.environ)
    env.update({
        "KERUTA_TASK_ID": task_id,
        "KERUTA_API_URL": config.api_url,
        "KERUTA_API_TOKEN": config.token,
        "KERUTA_WORK_DIR": str(config.work_dir),
        "KERUTA_ARTIFACTS_DIR": str(config.artifacts_dir),
    })
    # Scripts call the agent's helpers (`keruta-agent progress 50`): make sure this agent is on PATH.
    bin_dir = Path(sys.executable).parent
    if (bin_dir / "keruta-agent").exists():
        env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", os.defpath)])
    for key, value in (script.get("parameters") or {}).items():
        if isinstance(key, str) and key.isidentifier():
            env[f"KERUTA_PARAM_{key.upper()}"] = str(value)
    timeout = config.timeout or task.get("timeoutSeconds") or None

    shipper = LogShipper(client, task_id)
    terminated = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: terminated.set())  # kept through the hold that follows
    status, error_code, message = _execute(path, config, env, shipper, timeout, terminated, echo)

    if config.upload and status != "TERMINATED":
        upload_artifacts(config, client, shipper)
    unsent = shipper.close(config.retry_seconds)
    exit_code = {"COMPLETED": EXIT_OK, "FAILED": EXIT_TASK_FAILED, "TERMINATED": EXIT_TERMINATED}[status]
    if unsent:
        spool = config.work_dir / ".keruta" / "unsent-logs.jsonl"
        spool.parent.mkdir(parents=True, exist_ok=True)
        with spool.open("a", encoding="utf-8") as out:
            for item in unsent:
                out.write(json.dumps(item) + "\n")
        log.error("%d log lines could not be sent; kept in %s", len(unsent), spool)
        exit_code = EXIT_API_UNREACHABLE
    if status == "TERMINATED":
        # SIGTERM comes from a cancel, an eviction, a node drain or a deleted Job: the agent cannot tell
        # which, so it reports no final status; whoever stopped it (the flow) knows and decides. (A
        # CANCELLED here would also make an evicted task's replacement Pod fail on IN_PROGRESS.)
        return exit_code
    try:
        client.set_status(task_id, status, message=message, error_code=error_code)
    except ApiRejected as exc:
        # e.g. the flow already marked the task CANCELLED: that word stands, ours is dropped.
        log.warning("final status not accepted: %s", exc)
    except ApiError as exc:
        log.error("%s", exc)
        return EXIT_API_UNREACHABLE
    hold_for_collection(config, terminated)
    return exit_code


def upload_artifacts(config: AgentConfig, client: KerutaClient, shipper: LogShipper) -> None:
    """Upload mode (no pods/exec on the cluster): every regular file of the artifacts directory goes to
    POST /api/v1/tasks/{id}/artifacts. A file the API refuses (over a cap) is reported, not dropped silently."""
    root = config.artifacts_dir
    if not root.is_dir():
        return
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(root).as_posix()
        if relative == COLLECTED_MARKER:
            continue
        try:
            client.upload_artifact(config.task_id, path, relative)
        except ApiRejected as exc:
            shipper.emit("ERROR", f"artifact {relative} not kept: {exc.detail}")
        except ApiError as exc:
            shipper.emit("ERROR", f"artifact {relative} not uploaded: {exc}")


COLLECTED_MARKER = ".collected"
READY_LINE = "artifacts ready"


def hold_for_collection(config: AgentConfig, terminated: threading.Event) -> None:
    """Keep the container (and so its files) alive until the flow has collected them (it writes the
    marker), or the hold timeout passes — so a flow that vanished never leaves a zombie Pod."""
    if config.hold_seconds <= 0:
        return
    marker = config.artifacts_dir / COLLECTED_MARKER
    log.info("%s in %s; holding up to %gs for collection", READY_LINE, config.artifacts_dir, config.hold_seconds)
    deadline = time.monotonic() + config.hold_seconds
    while not marker.exists() and not terminated.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)
    if marker.exists():
        log.info("artifacts collected; exiting")
    else:
        log.warning("artifacts were not collected within %gs; exiting", config.hold_seconds)


def _execute(path: Path, config: AgentConfig, env: dict[str, str], shipper: LogShipper,
             timeout: float | None, terminated: threading.Event, echo: bool) -> tuple[str, str | None, str]:
    try:
        proc = subprocess.Popen(
            [str(path)], cwd=config.work_dir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # Its own process group (so a timeout can stop the script and its children without the
            # agent), but the agent's session: whoever stops the agent's session stops the script too.
            process_group=0,
        )
    except OSError as exc:
        shipper.emit("ERROR", f"cannot execute {path.name}: {exc.strerror}")
        return "FAILED", "SCRIPT_NOT_RUNNABLE", f"cannot execute {path.name}: {exc.strerror}"
    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=_pump, args=(proc.stdout, "INFO", shipper, echo), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, "ERROR", shipper, echo), daemon=True),
    ]
    for reader in readers:
        reader.start()
    started = time.monotonic()
    timed_out = False
    while proc.poll() is None:
        if terminated.is_set():
            break
        if timeout is not None and time.monotonic() - started >= timeout:
            timed_out = True
            break
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        _stop(proc, config.grace_seconds)
    # The script has ended; its children may still hold the pipes. Give the readers a moment to drain,
    # then end the whole process group so the pipes close and nothing blocks the final report.
    drain_deadline = time.monotonic() + 2.0
    for reader in readers:
        reader.join(timeout=max(0.0, drain_deadline - time.monotonic()))
    if any(r.is_alive() for r in readers):
        _kill_group(proc.pid, signal.SIGKILL)
        for reader in readers:
            reader.join(timeout=5)
    code = proc.returncode
    elapsed = time.monotonic() - started
    if terminated.is_set():
        shipper.emit("ERROR", "keruta-agent received SIGTERM; the script was stopped")
        return "TERMINATED", "TERMINATED", "the agent was terminated (SIGTERM) and stopped the script"
    if timed_out:
        message = f"script timed out after {timeout:g}s and was stopped"
        shipper.emit("ERROR", message)
        return "FAILED", "TIMEOUT", message
    if code == 0:
        return "COMPLETED", None, f"script exited with code 0 after {elapsed:.1f}s"
    if code < 0:
        name = signal.Signals(-code).name
        return "FAILED", f"SCRIPT_KILLED_{name}", f"script was killed by {name}"
    return "FAILED", f"SCRIPT_EXIT_{code}", f"script exited with code {code}"


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the script's process group, wait ``grace`` seconds, then SIGKILL it."""
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
