"""What `keruta-agent run` does: report, fetch, execute, stream logs, report the outcome.

Nothing the script prints is lost while the API is up: lines are numbered per agent session and shipped
in order, in batches bounded by lines and by bytes of JSON body (well under the API's and common proxies'
body caps); a batch whose answer was lost is sent again and the API stores each (session, number) once.

The API *refusing* lines is not the API being *unreachable*:

- a batch refused as too large (413) is split, and later batches stay under the size refused;
- a batch refused for its content (400, 409, 422…) is bisected down to the lines refused; only those are
  dropped, with one ERROR report (stderr and the task's log) saying how many and why;
- a refusal of everything (401 wrong token, 403, 404 task gone) stops shipping: reported once, the
  remaining lines go to the spool, and the agent exits EXIT_CONFIG (permanent; not retried).

While the API is unreachable the lines wait in memory, up to MEMORY_BYTES; past that, or once the API has
been away longer than the retry budget, they wait on disk in ``<work-dir>/.keruta/unsent-logs.jsonl`` and
are taken back from there, in order, when the API answers again. If it never comes back within the retry
budget, the unsent lines are left in that file and the agent exits ExitCode.API_UNREACHABLE.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from keruta_prefect.client import ApiError, ApiRejected, KerutaClient, encode_json
from keruta_prefect.contract import (
    COLLECTED_MARKER,
    PARAM_PREFIX,
    READY_LINE,
    SPOOL_FILE,
    Env,
    ExitCode,
    Reason,
    script_exit_reason,
    script_killed_reason,
)

log = logging.getLogger("keruta.agent")


MAX_LINE_BYTES = 16 * 1024  # longer lines are sent in pieces of this size
BATCH_LINES = 2000  # the API takes up to 5,000 lines per batch
# Bytes of JSON body per batch: the API takes 16 MiB, a default ingress-nginx 1 MiB (proxy-body-size).
BATCH_BYTES = 512 * 1024
# Unsent lines held in memory (bytes of JSON, as for batches); past this they wait in the spool file.
MEMORY_BYTES = 8 * 1024 * 1024
MIN_BATCH_BYTES = 4 * 1024  # a 413 never shrinks batches below this (a single line is always sent alone)
BATCH_SECONDS = 0.2
_ENVELOPE_BYTES = len(encode_json({"source": "agent-" + "0" * 16, "lines": []}))


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
    debug: bool = False  # an internal error's traceback goes to stderr too


@dataclass
class Line:
    """One numbered log line, and the bytes it adds to a batch's JSON body."""

    item: dict[str, Any]
    size: int
    report: bool = False  # the agent's own report of refused lines (never reported again if refused)

    @classmethod
    def of(cls, item: dict[str, Any], report: bool = False) -> Line:
        return cls(item, len(encode_json(item)) + 1, report)  # + the comma between items


def batch_length(lines: Sequence[Line], max_lines: int, max_bytes: int) -> int:
    """How many leading lines make one batch: at most ``max_lines``, a JSON body of at most ``max_bytes``
    (envelope included), and always at least one line (a line alone is never held back)."""
    total = _ENVELOPE_BYTES
    for count, line in enumerate(lines[:max_lines]):
        total += line.size
        if total > max_bytes and count > 0:
            return count
    return min(len(lines), max_lines)


def refusal_report(refused: Sequence[tuple[Line, ApiRejected]]) -> list[str]:
    """One message per distinct reason: how many lines were refused, which, and why."""
    by_reason: dict[str, list[int]] = {}
    for line, exc in refused:
        reason = f"HTTP {exc.status}: {exc.detail}"
        by_reason.setdefault(reason, []).append(int(line.item["seq"]))
    messages = []
    for reason, seqs in by_reason.items():
        shown = ", ".join(str(s) for s in seqs[:5]) + (", …" if len(seqs) > 5 else "")
        noun = "line" if len(seqs) == 1 else "lines"
        messages.append(f"keruta API refused {len(seqs)} log {noun} (seq {shown}); dropped: {reason}")
    return messages


REFUSED_IN_A_ROW = 32  # this many single lines refused in a row: a refusal of every line, not of some


def _copy(src: IO[bytes], out: IO[bytes], size: int) -> None:
    """``size`` bytes (or up to the end) from ``src`` to ``out``, a MiB at a time."""
    while size > 0 and (chunk := src.read(min(size, 1 << 20))):
        out.write(chunk)
        size -= len(chunk)


class LogShipper:
    """Numbers lines and sends them in ordered batches from a background thread.

    Unsent lines are held in memory up to ``memory_bytes`` (bytes of JSON, as batches count them). Past that,
    or once the API has been away longer than ``retry_seconds``, each new line is appended to ``spool`` (JSON
    lines) instead, and every later line follows it there until the shipper has taken them all back, in
    order, to send them: memory stays bounded whatever the script prints while the API is away, and no line
    overtakes an older one. The lines of the spool this shipper has taken back are cut off the file once it
    has taken back the last; at ``close`` the file holds exactly the lines not delivered (after whatever it
    held before). After ``close``: ``refused`` is the refusal of everything that stopped shipping (or None),
    ``failure`` an internal error of the shipping thread (or None), ``dropped`` how many lines the API refused
    one by one, ``lost`` how many lines could be neither kept nor written to the spool (a full disk)."""

    def __init__(self, client: KerutaClient, task_id: str, spool: Path, *, max_lines: int = BATCH_LINES,
                 max_bytes: int = BATCH_BYTES, debug: bool = False, memory_bytes: int = MEMORY_BYTES,
                 retry_seconds: float | None = None) -> None:
        self.client = client
        self.task_id = task_id
        self.spool = spool
        self.spooled = 0
        self.debug = debug
        self.source = f"agent-{uuid.uuid4().hex[:16]}"
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.retry_seconds = retry_seconds  # the API away longer than this: new lines go to the spool
        self.refused: ApiRejected | None = None
        self.failure: BaseException | None = None  # of the shipping thread, or of a reader (see _pump)
        self.dropped = 0
        self.lost = 0
        self._park_failed = False
        self._refused_in_a_row = 0  # single lines refused since the last stored batch
        self._open = True  # until the end mark close() queues has been read
        self._queue: queue.Queue[Line | None] = queue.Queue()
        self._seq = 0
        # Guards the numbering, the bytes held in memory and the spool's state: a line is numbered and put
        # in its place (memory or spool) at once, so no line overtakes an older one.
        self._lock = threading.Lock()
        self._pending: list[Line] = []
        self._mem_bytes = 0  # of the lines in the queue and in pending
        self._peak_bytes = 0
        self._down_since: float | None = None  # monotonic time of the first failure since the last success
        # Lines waiting in the spool: bytes [_spool_read, _spool_end) of the file, _spool_lines of them;
        # bytes [_spool_base, _spool_read) were taken back into memory. _spool_fd is open while any wait.
        self._spool_fd: int | None = None
        self._spool_base = self._spool_read = self._spool_end = 0
        self._spool_lines = 0
        self._refused_lines: list[tuple[Line, ApiRejected]] = []
        self._closing = threading.Event()
        self._close_deadline = 0.0
        self._thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)
        self._thread.start()

    @property
    def pending_bytes(self) -> int:
        """Bytes (of JSON) of the unsent lines held in memory now; the rest wait in the spool file."""
        return self._mem_bytes

    @property
    def peak_pending_bytes(self) -> int:
        """The most ``pending_bytes`` has been."""
        return self._peak_bytes

    @property
    def waiting_in_spool(self) -> int:
        """How many lines wait in the spool file to be taken back and sent."""
        return self._spool_lines

    def emit(self, level: str, message: str) -> None:
        with self._lock:
            line = self._numbered(level, message)
            if self._spool_fd is None and not self._must_spool(line.size):
                self._hold(line.size)
                self._queue.put(line)
            elif not self._park(line):
                if self._spool_lines == 0 and self._mem_bytes + line.size <= self.memory_bytes:
                    self._hold(line.size)  # the disk refused it, memory can still hold it: nothing overtaken
                    self._queue.put(line)
                else:
                    if not self.lost:
                        log.error("log lines lost: %s cannot be written and memory is full", self.spool)
                    self.lost += 1

    def _line(self, level: str, message: str, report: bool = False) -> Line:
        with self._lock:
            return self._numbered(level, message, report)

    def _numbered(self, level: str, message: str, report: bool = False) -> Line:
        seq = self._seq
        self._seq += 1
        return Line.of({"seq": seq, "level": level, "message": message, "ts": time.time()}, report)

    def _must_spool(self, size: int) -> bool:
        if self._mem_bytes + size > self.memory_bytes:
            return True
        down_since, budget = self._down_since, self.retry_seconds
        return down_since is not None and budget is not None and time.monotonic() - down_since > budget

    def _hold(self, size: int) -> None:
        self._mem_bytes += size
        self._peak_bytes = max(self._peak_bytes, self._mem_bytes)

    def _park(self, line: Line) -> bool:
        """Append one line to the spool (the lock is held); False when it cannot be written."""
        data = (json.dumps(line.item) + "\n").encode("utf-8")
        try:
            if self._spool_fd is None:
                self.spool.parent.mkdir(parents=True, exist_ok=True)
                self._spool_fd = os.open(self.spool, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                self._spool_base = self._spool_read = self._spool_end = os.fstat(self._spool_fd).st_size
            written = 0
            while written < len(data):
                written += os.write(self._spool_fd, data[written:])
        except OSError as exc:
            if self._spool_fd is not None:
                try:
                    os.ftruncate(self._spool_fd, self._spool_end)  # no half line
                except OSError:
                    pass
            if not self._park_failed:
                log.error("cannot write %s: %s", self.spool, exc.strerror or exc)
                self._park_failed = True
            return False
        self._spool_end += len(data)
        self._spool_lines += 1
        return True

    def _take_back(self) -> None:
        """Once memory holds no unsent line, read the oldest lines waiting in the spool back into pending (up to
        half the memory bound). When the last is read, the file is cut back and new lines stay in memory again."""
        # (Lines still queued are older than those in the spool: while any wait there, none is queued.)
        if self._pending or (self._open and not self._queue.empty()) or not self._spool_lines:
            return
        with self._lock:
            start, end = self._spool_read, self._spool_end
        with self.spool.open("rb") as src:
            src.seek(start)
            data = src.read(min(end - start, max(1, self.memory_bytes // 2)))
            if not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                data = data[:cut] if cut else data + src.readline()  # a line longer than the chunk: whole
        lines = [Line.of(json.loads(raw)) for raw in data.splitlines()]
        with self._lock:
            self._pending.extend(lines)
            self._hold(sum(line.size for line in lines))
            self._spool_read += len(data)
            self._spool_lines -= len(lines)
            if self._spool_read == self._spool_end:  # all taken back: cut them off, new lines stay in memory
                self._close_spool(truncate=True)

    def _close_spool(self, truncate: bool) -> None:
        if self._spool_fd is None:
            return
        try:
            if truncate:
                os.ftruncate(self._spool_fd, self._spool_base)
        finally:
            os.close(self._spool_fd)
            self._spool_fd = None
            self._spool_base = self._spool_read = self._spool_end = 0

    def _shift(self, count: int) -> None:
        """The first ``count`` pending lines are delivered or dropped: they leave memory."""
        with self._lock:
            self._mem_bytes -= sum(line.size for line in self._pending[:count])
            del self._pending[:count]

    def _drain(self, block_for: float) -> None:
        """Move queued lines to pending (up to a few batches); ``_open`` turns False at the end mark."""
        try:
            item = self._queue.get(timeout=block_for) if block_for > 0 else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is None:
                self._open = False
                return
            self._pending.append(item)
            if len(self._pending) >= self.max_lines * 4:
                return
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def _budget(self) -> float:
        # While the script runs: one attempt per round, so new lines keep being collected;
        # at close: whatever is left of the retry budget.
        return max(0.0, self._close_deadline - time.monotonic()) if self._closing.is_set() else 0.0

    def _run(self) -> None:
        try:
            self._ship()
        except Exception as exc:  # the agent's own bug: the lines left are spooled, the exit code says so
            self.failure = exc
            log.error("internal error while sending log lines: %s: %s", type(exc).__name__, exc,
                      exc_info=self.debug)
        # Nothing more will be sent (refused for good, or the bug above): what the script still prints
        # goes to the spool as it comes, not into memory.
        while self._open:
            self._drain(BATCH_SECONDS)
            self._to_spool()

    def _ship(self) -> None:
        backoff = 0.1
        while self._open or self._pending or self._spool_lines:
            if self._open:
                # Lines that arrive while a batch is in flight form the next batch.
                self._drain(0.0 if self._pending or self._spool_lines else BATCH_SECONDS)
            self._take_back()
            if not self._pending:
                continue
            try:
                self._deliver(batch_length(self._pending, self.max_lines, self.max_bytes))
            except ApiRejected as exc:  # refused for good: no use sending more
                self.refused = exc
                log.error("keruta API refuses this agent's log lines, no more are sent (kept in %s): %s",
                          self.spool, exc)
                return
            except ApiError:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                if self._closing.is_set() and time.monotonic() >= self._close_deadline:
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            finally:
                self._report_refused()
            self._down_since = None
            backoff = 0.1

    def _deliver(self, count: int) -> None:
        """Send the first ``count`` pending lines. A refusal that concerns the batch (not everything) splits
        it: 413 because it is too large, another 4xx to find the lines refused, which are dropped. Each part
        leaves pending once stored or dropped, so after an ApiError the next round resumes where this one
        stopped. A permanent refusal is raised."""
        batch = self._pending[:count]
        try:
            self.client.post_logs(self.task_id, self.source, [line.item for line in batch],
                                  retry_seconds=self._budget())
        except ApiRejected as exc:
            if exc.permanent:
                raise
            if exc.status == 413:  # later batches stay under the size refused
                size = _ENVELOPE_BYTES + sum(line.size for line in batch)
                self.max_bytes = max(MIN_BATCH_BYTES, min(self.max_bytes, size // 2))
            if count == 1:
                self._refused_lines.append((batch[0], exc))
                self._shift(1)
                self._refused_in_a_row += 1
                if self._refused_in_a_row >= REFUSED_IN_A_ROW:  # not these lines: the API refuses any line
                    raise ApiRejected(exc.status, f"{exc.detail} (the last {REFUSED_IN_A_ROW} lines were all "
                                                  "refused, one by one)", exc.what) from None
                return
            half = count // 2
            self._deliver(half)
            self._deliver(count - half)
            return
        self._shift(count)
        self._refused_in_a_row = 0

    def _report_refused(self) -> None:
        if not self._refused_lines:
            return
        refused, self._refused_lines = self._refused_lines, []
        self.dropped += len(refused)
        for message in refusal_report([r for r in refused if not r[0].report]):
            log.error("%s", message)
            # Straight into the next batch: at close, the queue is no longer read after its end mark.
            line = self._line("ERROR", message, report=True)
            with self._lock:
                self._pending.append(line)
                self._hold(line.size)
        for message in refusal_report([r for r in refused if r[0].report]):
            log.error("%s (the report of refused lines itself)", message)

    def _to_spool(self) -> None:
        """Leave every unsent line in the spool, in order: the lines in memory, then those waiting in the file.
        The file ends up as what it held before this shipper, then exactly these lines."""
        with self._lock:
            lines, self._pending = self._pending, []
            self._mem_bytes -= sum(line.size for line in lines)
            waiting = self._spool_lines
            try:
                if not waiting:
                    self._close_spool(truncate=True)
                    if lines:
                        self.spool.parent.mkdir(parents=True, exist_ok=True)
                        with self.spool.open("a", encoding="utf-8") as out:
                            out.writelines(json.dumps(line.item) + "\n" for line in lines)
                elif lines or self._spool_read > self._spool_base:
                    self._rewrite_spool(lines)
                else:
                    self._close_spool(truncate=False)  # the file already ends with exactly these lines
            except OSError as exc:
                log.error("%d log lines lost: cannot write %s: %s", len(lines) + waiting, self.spool,
                          exc.strerror or exc)
                self.lost += len(lines) + waiting
                self._spool_lines = 0
                self._close_spool(truncate=False)
                return
            self._spool_lines = 0
            self.spooled += len(lines) + waiting

    def _rewrite_spool(self, lines: list[Line]) -> None:
        """The file's bytes before this shipper, then ``lines``, then the lines still waiting (streamed: the
        waiting lines are never read whole into memory)."""
        temporary = self.spool.with_name(self.spool.name + ".tmp")
        try:
            with self.spool.open("rb") as src, temporary.open("wb") as out:
                _copy(src, out, self._spool_base)
                out.writelines((json.dumps(line.item) + "\n").encode("utf-8") for line in lines)
                src.seek(self._spool_read)
                _copy(src, out, self._spool_end - self._spool_read)
            os.replace(temporary, self.spool)
        except BaseException:
            temporary.unlink(missing_ok=True)  # a full disk: do not leave half a copy taking its space
            raise
        self._close_spool(truncate=False)

    def close(self, timeout: float) -> int:
        """Flush everything, waiting up to ``timeout`` seconds for the API; the lines that could not be
        delivered are left in the spool. Returns how many lines are in the spool (0 on success)."""
        self._close_deadline = time.monotonic() + timeout
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout + 30)  # a request in flight at the deadline ends within its own timeout
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._pending.append(item)
        self._to_spool()
        return self.spooled


def _lines(stream: IO[bytes]) -> Iterator[str]:
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


def _pump(stream: IO[bytes], shipper: LogShipper, echo: bool) -> None:
    """Ship every line of one of the script's streams at INFO: a program's stderr carries progress and
    diagnostics as much as errors; whether the task failed is said by its exit code (and the agent's own
    ERROR line). Keeps reading whatever happens, so the script never blocks on a full pipe."""
    try:
        for line in _lines(stream):
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
        while stream.read(1 << 16):
            pass


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
        client.set_status(task_id, "IN_PROGRESS", message="keruta-agent started")
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
    name = os.path.basename(str(script.get("filename") or "script.sh"))
    path = config.work_dir / (name if name not in ("", ".", "..") else "script.sh")
    try:
        path.write_bytes(str(script.get("content") or "").encode("utf-8"))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IRUSR)
    except OSError as exc:
        message = f"cannot write the script to {path}: {exc.strerror or exc}"
        shipper.emit("ERROR", message)
        status, error_code = "FAILED", Reason.SCRIPT_NOT_RUNNABLE.value
    else:
        env = _script_env(config, script)
        timeout = config.timeout or task.get("timeoutSeconds") or None
        status, error_code, message = _execute(path, config, env, shipper, timeout, terminated, echo)

    if config.upload and status != "TERMINATED":
        upload_artifacts(config, client, shipper)
    spooled = shipper.close(config.retry_seconds)
    if shipper.lost:  # the API away, the spool unwritable and memory full at once: said, not hidden
        log.error("%d log lines lost: neither sent nor written to %s", shipper.lost, spool)
    exit_code = {"COMPLETED": ExitCode.OK, "FAILED": ExitCode.TASK_FAILED, "TERMINATED": ExitCode.TERMINATED}[status]
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
    if status == "TERMINATED":
        # SIGTERM comes from a cancel, an eviction, a node drain or a deleted Job: the agent cannot tell
        # which, so it reports no final status; whoever stopped it (the flow) knows and decides. (A
        # CANCELLED here would also make an evicted task's replacement Pod fail on IN_PROGRESS.)
        return exit_code
    try:
        client.set_status(task_id, status, message=message, error_code=error_code)
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
        return "FAILED", Reason.SCRIPT_NOT_RUNNABLE.value, f"cannot execute {path.name}: {exc.strerror}"
    assert proc.stdout is not None and proc.stderr is not None
    readers = [threading.Thread(target=_pump, args=(stream, shipper, echo), daemon=True)
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
        return "TERMINATED", Reason.TERMINATED.value, "the agent was terminated (SIGTERM) and stopped the script"
    if timed_out:
        message = f"script timed out after {timeout:g}s and was stopped"
        shipper.emit("ERROR", message)
        return "FAILED", Reason.TIMEOUT.value, message
    if code == 0:
        return "COMPLETED", None, f"script exited with code 0 after {elapsed:.1f}s"
    if code < 0:
        name = signal.Signals(-code).name
        error_code, message = script_killed_reason(name), f"script was killed by {name}"
    else:
        error_code, message = script_exit_reason(code), f"script exited with code {code}"
    shipper.emit("ERROR", message)  # the script's own lines are all INFO: the failure is said here
    return "FAILED", error_code, message


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
