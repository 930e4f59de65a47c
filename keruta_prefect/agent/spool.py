"""Where unsent log lines wait: in memory up to a bound, past it on disk, always in order.

:class:`Backlog` numbers the lines as they come and holds them in memory up to ``memory_bytes`` (bytes of
JSON, as batches count them). Past that, or once the API has been away longer than ``retry_seconds``, each
new line is appended to the :class:`SpoolFile` (``<work-dir>/.keruta/unsent-logs.jsonl``, JSON lines)
instead, and every later line follows it there until the shipper has taken them all back, in order, to send
them: memory stays bounded whatever the script prints while the API is away, and no line overtakes an older
one. At the end the file holds exactly the lines not delivered (after whatever it held before).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import IO

from keruta_prefect.agent.batches import Line
from keruta_prefect.backoff import SYSTEM_CLOCK, Clock

log = logging.getLogger("keruta.agent")

# Unsent lines held in memory (bytes of JSON, as for batches); past this they wait in the spool file.
MEMORY_BYTES = 8 * 1024 * 1024
COPY_CHUNK = 1 << 20  # bytes copied at a time when the spool is rewritten
DRAIN_LINES_BATCHES = 4  # lines moved from the queue to pending at once: up to this many batches


def _copy(src: IO[bytes], out: IO[bytes], size: int) -> None:
    """``size`` bytes (or up to the end) from ``src`` to ``out``, a chunk at a time."""
    while size > 0 and (chunk := src.read(min(size, COPY_CHUNK))):
        out.write(chunk)
        size -= len(chunk)


def _encoded(line: Line) -> bytes:
    return (json.dumps(line.item) + "\n").encode("utf-8")


class SpoolFile:
    """The spool on disk: lines appended at its end, taken back from its start.

    Lines waiting in it are bytes ``[read, end)`` of the file, ``waiting`` of them; bytes ``[base, read)`` were
    taken back into memory; bytes before ``base`` were there before this agent. The file is open while any
    line waits. Not thread-safe: :class:`Backlog` calls it under its lock (but for :meth:`read`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.waiting = 0
        self._fd: int | None = None
        self._base = self._read = self._end = 0
        self._failed = False  # a write failure was said (once)

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def span(self) -> tuple[int, int]:
        """Bytes ``(read, end)``: where the waiting lines are."""
        return self._read, self._end

    def park(self, line: Line) -> bool:
        """Append one line; False when it cannot be written (said once; no half line is left)."""
        data = _encoded(line)
        try:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                self._base = self._read = self._end = os.fstat(self._fd).st_size
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            if self._fd is not None:
                try:
                    os.ftruncate(self._fd, self._end)  # no half line
                except OSError:
                    pass
            if not self._failed:
                log.error("cannot write %s: %s", self.path, exc.strerror or exc)
                self._failed = True
            return False
        self._end += len(data)
        self.waiting += 1
        return True

    def read(self, start: int, end: int, limit: int) -> bytes:
        """Whole lines from bytes ``[start, end)``: about ``limit`` bytes, a line longer than that whole.
        (Lines appended meanwhile lie past ``end``: no lock is needed.)"""
        with self.path.open("rb") as src:
            src.seek(start)
            data = src.read(min(end - start, max(1, limit)))
            if not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                data = data[:cut] if cut else data + src.readline()  # a line longer than the chunk: whole
        return data

    def taken_back(self, size: int, count: int) -> None:
        """``count`` lines (``size`` bytes) were read back into memory. When the last is, the file is cut back
        to what it held before and closed: new lines stay in memory again."""
        self._read += size
        self.waiting -= count
        if self._read == self._end:
            self.close(truncate=True)

    def close(self, truncate: bool) -> None:
        if self._fd is None:
            return
        try:
            if truncate:
                os.ftruncate(self._fd, self._base)
        finally:
            os.close(self._fd)
            self._fd = None
            self._base = self._read = self._end = 0

    def leave(self, lines: list[Line]) -> tuple[int, int]:
        """Make the file what it held before, then ``lines``, then the lines still waiting (older lines are
        in memory than on disk). Returns (lines kept in it, lines lost because it could not be written)."""
        count = len(lines) + self.waiting
        try:
            if not self.waiting:
                self.close(truncate=True)
                if lines:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with self.path.open("a", encoding="utf-8") as out:
                        out.writelines(json.dumps(line.item) + "\n" for line in lines)
            elif lines or self._read > self._base:
                self._rewrite(lines)
            else:
                self.close(truncate=False)  # the file already ends with exactly these lines
        except OSError as exc:
            log.error("%d log lines lost: cannot write %s: %s", count, self.path, exc.strerror or exc)
            self.waiting = 0
            self.close(truncate=False)
            return 0, count
        self.waiting = 0
        return count, 0

    def _rewrite(self, lines: list[Line]) -> None:
        """The file's bytes before this agent, then ``lines``, then the lines still waiting (streamed: the
        waiting lines are never read whole into memory)."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            with self.path.open("rb") as src, temporary.open("wb") as out:
                _copy(src, out, self._base)
                out.writelines(_encoded(line) for line in lines)
                src.seek(self._read)
                _copy(src, out, self._end - self._read)
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)  # a full disk: do not leave half a copy taking its space
            raise
        self.close(truncate=False)


class Backlog:
    """The unsent lines, in order: numbered as they come (from any thread), queued in memory up to
    ``memory_bytes``, else parked in the :class:`SpoolFile`; ``pending`` are the ones the shipping thread
    took from the queue or the spool to send next (only that thread touches ``pending``).

    ``spooled``: lines left in the spool at the end; ``lost``: lines that could be neither kept in memory nor
    written to the spool (a full disk)."""

    def __init__(self, spool: Path, *, memory_bytes: int = MEMORY_BYTES, retry_seconds: float | None = None,
                 max_lines: int, clock: Clock = SYSTEM_CLOCK) -> None:
        self.file = SpoolFile(spool)
        self.memory_bytes = memory_bytes
        self.retry_seconds = retry_seconds  # the API away longer than this: new lines go to the spool
        self.spooled = 0
        self.lost = 0
        self.open = True  # until the end mark (see end()) has been read from the queue
        self.pending: list[Line] = []
        self._drain_lines = max_lines * DRAIN_LINES_BATCHES
        self._clock = clock
        self._queue: queue.Queue[Line | None] = queue.Queue()
        self._seq = 0
        # Guards the numbering, the bytes held in memory and the spool's state: a line is numbered and put
        # in its place (memory or spool) at once, so no line overtakes an older one.
        self._lock = threading.Lock()
        self._mem_bytes = 0  # of the lines in the queue and in pending
        self._peak_bytes = 0
        self._down_since: float | None = None  # clock time of the first failure since the last success

    @property
    def pending_bytes(self) -> int:
        """Bytes (of JSON) of the unsent lines held in memory now; the rest wait in the spool file."""
        return self._mem_bytes

    @property
    def peak_pending_bytes(self) -> int:
        return self._peak_bytes

    @property
    def waiting_in_spool(self) -> int:
        return self.file.waiting

    # --- any thread ------------------------------------------------------------------------------------------
    def add(self, level: str, message: str) -> None:
        """A new line of the task's log: into memory, or the spool (see the class)."""
        with self._lock:
            line = self._numbered(level, message)
            if not self.file.is_open and not self._must_spool(line.size):
                self._hold(line.size)
                self._queue.put(line)
            elif not self.file.park(line):
                if self.file.waiting == 0 and self._mem_bytes + line.size <= self.memory_bytes:
                    self._hold(line.size)  # the disk refused it, memory can still hold it: nothing overtaken
                    self._queue.put(line)
                else:
                    if not self.lost:
                        log.error("log lines lost: %s cannot be written and memory is full", self.file.path)
                    self.lost += 1

    def end(self) -> None:
        """No more lines will be added: the end mark goes after the last."""
        self._queue.put(None)

    # --- the shipping thread -----------------------------------------------------------------------------------
    def add_report(self, message: str) -> None:
        """The agent's own report of refused lines, straight into the next batch (at close, the queue is no
        longer read after its end mark)."""
        with self._lock:
            line = self._numbered("ERROR", message, report=True)
            self.pending.append(line)
            self._hold(line.size)

    def api_down(self) -> None:
        if self._down_since is None:
            self._down_since = self._clock.now()

    def api_up(self) -> None:
        self._down_since = None

    def shift(self, count: int) -> None:
        """The first ``count`` pending lines are delivered or dropped: they leave memory."""
        with self._lock:
            self._mem_bytes -= sum(line.size for line in self.pending[:count])
            del self.pending[:count]

    def drain(self, block_for: float) -> None:
        """Move queued lines to pending (up to a few batches); ``open`` turns False at the end mark."""
        try:
            item = self._queue.get(timeout=block_for) if block_for > 0 else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is None:
                self.open = False
                return
            self.pending.append(item)
            if len(self.pending) >= self._drain_lines:
                return
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def take_back(self) -> None:
        """Once memory holds no unsent line, read the oldest lines waiting in the spool back into pending (up to
        half the memory bound)."""
        # (Lines still queued are older than those in the spool: while any wait there, none is queued.)
        if self.pending or (self.open and not self._queue.empty()) or not self.file.waiting:
            return
        with self._lock:
            start, end = self.file.span()
        data = self.file.read(start, end, self.memory_bytes // 2)
        lines = [Line.of(json.loads(raw)) for raw in data.splitlines()]
        with self._lock:
            self.pending.extend(lines)
            self._hold(sum(line.size for line in lines))
            self.file.taken_back(len(data), len(lines))

    def to_spool(self) -> None:
        """Leave every unsent line in the spool, in order: the lines in memory, then those waiting in the file.
        The file ends up as what it held before this agent, then exactly these lines."""
        with self._lock:
            lines, self.pending = self.pending, []
            self._mem_bytes -= sum(line.size for line in lines)
            kept, lost = self.file.leave(lines)
            self.spooled += kept
            self.lost += lost

    def collect_queued(self) -> None:
        """After the shipping thread ended: the lines still queued join pending."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self.pending.append(item)

    # --- under the lock ----------------------------------------------------------------------------------------
    def _numbered(self, level: str, message: str, report: bool = False) -> Line:
        seq = self._seq
        self._seq += 1
        return Line.of({"seq": seq, "level": level, "message": message, "ts": time.time()}, report)

    def _must_spool(self, size: int) -> bool:
        if self._mem_bytes + size > self.memory_bytes:
            return True
        down_since, budget = self._down_since, self.retry_seconds
        return down_since is not None and budget is not None and self._clock.now() - down_since > budget

    def _hold(self, size: int) -> None:
        self._mem_bytes += size
        self._peak_bytes = max(self._peak_bytes, self._mem_bytes)
