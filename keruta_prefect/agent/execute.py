"""Running the task's script: write it, start it in its own process group, pump its output into the
shipper line by line, stop it on timeout or SIGTERM (or over its memory limit), measure what it used
(:mod:`.usage`), and say how it ended (:class:`ScriptEnd`)."""

from __future__ import annotations

import codecs
import dataclasses
import logging
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from keruta_prefect.agent.batches import MAX_LINE_BYTES
from keruta_prefect.agent.shipper import LogShipper
from keruta_prefect.agent.usage import ScriptMeter, mebibytes
from keruta_prefect.contract import Reason, TaskStatus, script_exit_reason, script_killed_reason

log = logging.getLogger("keruta.agent")

DEFAULT_SCRIPT_NAME = "script.sh"
POLL_SECONDS = 0.05  # how often the script's end, the timeout and SIGTERM are checked
DRAIN_SECONDS = 2.0  # after the script ended, its children may hold the pipes this long before being killed
KILLED_DRAIN_SECONDS = 5.0  # after the process group was killed, the readers end within this
READ_CHUNK = 1 << 16  # bytes read at a time when a pipe is drained after a reader's failure


@dataclasses.dataclass(frozen=True)
class ScriptEnd:
    """How the script ended. ``status`` None: the agent got SIGTERM and reports no final status (whoever
    stopped it decides); otherwise the status the agent reports, with ``error_code`` and ``message``."""

    status: TaskStatus | None
    error_code: str | None
    message: str
    usage: dict[str, Any] | None = None  # what the script used (contract.UsageKey), sent with the final status

    @property
    def terminated(self) -> bool:
        return self.status is None


def script_path(work_dir: Path, filename: str) -> Path:
    """Where the script is written: its file name (never a path) in ``work_dir``."""
    name = os.path.basename(filename or DEFAULT_SCRIPT_NAME)
    return work_dir / (name if name not in ("", ".", "..") else DEFAULT_SCRIPT_NAME)


def write_script(path: Path, content: str) -> None:
    """The script as an executable file. Raises OSError."""
    path.write_bytes(content.encode("utf-8"))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IRUSR)


class ByteStream(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...

    def read(self, size: int = -1, /) -> bytes: ...


class CountedStream:
    """A pipe whose bytes are counted as they are read (the script's output, for its usage)."""

    def __init__(self, stream: IO[bytes], meter: ScriptMeter) -> None:
        self.stream, self.meter = stream, meter

    def readline(self, size: int = -1, /) -> bytes:
        return self._counted(self.stream.readline(size))

    def read(self, size: int = -1, /) -> bytes:
        return self._counted(self.stream.read(size))

    def _counted(self, data: bytes) -> bytes:
        self.meter.add_output(len(data))
        return data


def read_lines(stream: ByteStream) -> Iterator[str]:
    """Decoded lines of a byte stream: UTF-8 decoded incrementally (invalid bytes and NUL → U+FFFD, as a
    database's text column cannot hold NUL), lines longer than MAX_LINE_BYTES split into pieces, the final
    unterminated line included. A line of exactly MAX_LINE_BYTES is one piece, not a piece and an empty line."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    partial = ""
    just_split = False  # a piece was cut at MAX_LINE_BYTES and nothing of the line came after it yet
    while True:
        chunk = stream.readline(MAX_LINE_BYTES)
        if not chunk:
            tail = partial + decoder.decode(b"", final=True)
            if tail:
                yield tail.rstrip("\r").replace("\x00", "\ufffd")
            return
        text = decoder.decode(chunk)
        if chunk.endswith(b"\n"):
            line = (partial + text)[:-1].rstrip("\r")
            if line or not just_split:
                yield line.replace("\x00", "\ufffd")
            partial = ""
            just_split = False
        else:
            partial += text
            just_split = False
            if len(partial.encode("utf-8", "surrogatepass")) >= MAX_LINE_BYTES:
                yield partial.replace("\x00", "\ufffd")
                partial = ""
                just_split = True


def pump(stream: ByteStream, shipper: LogShipper, echo: bool) -> None:
    """Ship every line of one of the script's streams at INFO: a program's stderr carries progress and
    diagnostics as much as errors; whether the task failed is said by its exit code (and the agent's own
    ERROR line). Keeps reading whatever happens, so the script never blocks on a full pipe."""
    try:
        for line in read_lines(stream):
            shipper.emit("INFO", line)
            if echo:
                try:
                    print(line, flush=True)
                except (OSError, ValueError):  # stdout closed: the lines still go to the API
                    echo = False
    except Exception as exc:  # the agent's own bug: say so in one line, then drain the pipe
        shipper.failure = shipper.failure or exc  # the exit code will say so (ExitCode.INTERNAL)
        log.error("internal error while reading the script's output: %s: %s", type(exc).__name__, exc,
                  exc_info=shipper.debug)
        while stream.read(READ_CHUNK):
            pass


def execute(path: Path, *, cwd: Path, env: dict[str, str], shipper: LogShipper, timeout: float | None,
            grace_seconds: float, terminated: threading.Event, echo: bool,
            memory_limit: int | None = None) -> ScriptEnd:
    """Run the script to its end (or until ``timeout``, ``terminated``, or its process tree's RSS over
    ``memory_limit`` bytes); its output goes to ``shipper``; what it used goes with its end."""
    meter = ScriptMeter(memory_limit)
    meter.begin()
    try:
        proc = subprocess.Popen(
            [str(path)], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # Its own process group (so a timeout can stop the script and its children without the
            # agent), but the agent's session: whoever stops the agent's session stops the script too.
            process_group=0,
        )
    except OSError as exc:
        message = f"cannot execute {path.name}: {exc.strerror}"
        shipper.emit("ERROR", message)
        return ScriptEnd(TaskStatus.FAILED, Reason.SCRIPT_NOT_RUNNABLE.value, message)
    assert proc.stdout is not None and proc.stderr is not None
    meter.watch(proc.pid)
    readers = [threading.Thread(target=pump, args=(CountedStream(stream, meter), shipper, echo), daemon=True)
               for stream in (proc.stdout, proc.stderr)]
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
            proc.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        stop(proc, grace_seconds)
    meter.script_ended()
    # The script has ended; its children may still hold the pipes. Give the readers a moment to drain,
    # then end the whole process group so the pipes close and nothing blocks the final report.
    drain_deadline = time.monotonic() + DRAIN_SECONDS
    for reader in readers:
        reader.join(timeout=max(0.0, drain_deadline - time.monotonic()))
    if any(r.is_alive() for r in readers):
        kill_group(proc.pid, signal.SIGKILL)
        for reader in readers:
            reader.join(timeout=KILLED_DRAIN_SECONDS)
    measured = meter.finish()
    if meter.over_limit and not terminated.is_set():
        assert memory_limit is not None
        how = "and was killed" if meter.killed else "(it ended before it was killed; a container would have been)"
        message = (f"script went over its memory limit of {mebibytes(memory_limit)} ({memory_limit} bytes) with "
                   f"{mebibytes(measured.peak_memory_bytes)} ({measured.peak_memory_bytes} bytes) {how}")
        shipper.emit("ERROR", message)
        end = ScriptEnd(TaskStatus.FAILED, Reason.OOM_KILLED.value, message)
    else:
        end = _ending(proc.returncode, time.monotonic() - started, shipper, timeout if timed_out else None,
                      terminated.is_set())
    return dataclasses.replace(end, usage=measured.as_report())


def _ending(code: int, elapsed: float, shipper: LogShipper, timed_out_after: float | None,
            terminated: bool) -> ScriptEnd:
    if terminated:
        shipper.emit("ERROR", "keruta-agent received SIGTERM; the script was stopped")
        return ScriptEnd(None, Reason.TERMINATED.value, "the agent was terminated (SIGTERM) and stopped the script")
    if timed_out_after is not None:
        message = f"script timed out after {timed_out_after:g}s and was stopped"
        shipper.emit("ERROR", message)
        return ScriptEnd(TaskStatus.FAILED, Reason.TIMEOUT.value, message)
    if code == 0:
        return ScriptEnd(TaskStatus.COMPLETED, None, f"script exited with code 0 after {elapsed:.1f}s")
    if code < 0:
        name = signal.Signals(-code).name
        error_code, message = script_killed_reason(name), f"script was killed by {name}"
    else:
        error_code, message = script_exit_reason(code), f"script exited with code {code}"
    shipper.emit("ERROR", message)  # the script's own lines are all INFO: the failure is said here
    return ScriptEnd(TaskStatus.FAILED, error_code, message)


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the script's process group, wait ``grace`` seconds, then SIGKILL it."""
    kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
