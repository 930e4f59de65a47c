"""Shipping the task's log lines to the keruta API, in order, from a background thread.

Nothing the script prints is lost while the API is up: lines are numbered per agent session and shipped
in order, in batches bounded by lines and by bytes of JSON body (see :mod:`.batches`); a batch whose answer
was lost is sent again and the API stores each (session, number) once. While the API is away the lines wait
in the :class:`~.spool.Backlog` (memory, then the spool file).

The API *refusing* lines is not the API being *unreachable* (:class:`Delivery`):

- a batch refused as too large (413) is split, and later batches stay under the size refused;
- a batch refused for its content (400, 409, 422…) is bisected down to the lines refused; only those are
  dropped, with one ERROR report (stderr and the task's log) saying how many and why;
- a refusal of everything (401 wrong token, 403, 404 task gone) stops shipping: reported once, the
  remaining lines go to the spool, and the agent exits ExitCode.CONFIG (permanent; not retried).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from keruta_prefect.agent.batches import (
    BATCH_BYTES,
    BATCH_LINES,
    REFUSED_IN_A_ROW,
    Line,
    batch_length,
    bytes_after_too_large,
    new_source,
    refusal_report,
)
from keruta_prefect.agent.spool import MEMORY_BYTES, Backlog
from keruta_prefect.backoff import SYSTEM_CLOCK, Backoff, Clock
from keruta_prefect.client import ApiError, ApiRejected, KerutaClient

log = logging.getLogger("keruta.agent")

BATCH_SECONDS = 0.2  # how long the shipper waits for lines before it sends what it has
# Pauses between rounds while the API is unreachable: 0.1 s doubling to 5 s (no jitter: one agent per task).
SHIP_BACKOFF_INITIAL = 0.1
SHIP_BACKOFF_CAP = 5.0
JOIN_MARGIN_SECONDS = 30.0  # a request in flight at the close deadline ends within its own timeout
HTTP_TOO_LARGE = 413


class Delivery:
    """Sends the backlog's pending lines, a batch at a time. A refusal that concerns the batch (not everything)
    splits it: 413 because it is too large, another 4xx to find the lines refused, which are dropped. Each
    part leaves pending once stored or dropped, so after an ApiError the next round resumes where this one
    stopped. A permanent refusal (or REFUSED_IN_A_ROW single lines refused in a row) is raised."""

    def __init__(self, client: KerutaClient, task_id: str, backlog: Backlog, *, max_lines: int, max_bytes: int,
                 budget: Callable[[], float]) -> None:
        self.client = client
        self.task_id = task_id
        self.backlog = backlog
        self.source = new_source()
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.dropped = 0  # lines the API refused one by one
        self._budget = budget  # seconds the client may retry each request
        self._refused_in_a_row = 0  # single lines refused since the last stored batch
        self._refused: list[tuple[Line, ApiRejected]] = []

    def send_next(self) -> None:
        """Send the next batch of pending lines."""
        self._deliver(batch_length(self.backlog.pending, self.max_lines, self.max_bytes))

    def refusals(self) -> tuple[list[str], list[str]]:
        """The lines refused since the last call, as messages: (about the task's own lines, to be reported in
        its log; about the agent's reports of refused lines, only said on stderr)."""
        refused, self._refused = self._refused, []
        self.dropped += len(refused)
        return (refusal_report([r for r in refused if not r[0].report]),
                refusal_report([r for r in refused if r[0].report]))

    def _deliver(self, count: int) -> None:
        """Send the first ``count`` pending lines (see the class)."""
        batch = self.backlog.pending[:count]
        try:
            self.client.post_logs(self.task_id, self.source, [line.item for line in batch],
                                  retry_seconds=self._budget())
        except ApiRejected as exc:
            if exc.permanent:
                raise
            if exc.status == HTTP_TOO_LARGE:  # later batches stay under the size refused
                self.max_bytes = bytes_after_too_large(batch, self.max_bytes)
            if count == 1:
                self._refused.append((batch[0], exc))
                self.backlog.shift(1)
                self._refused_in_a_row += 1
                if self._refused_in_a_row >= REFUSED_IN_A_ROW:  # not these lines: the API refuses any line
                    raise ApiRejected(exc.status, f"{exc.detail} (the last {REFUSED_IN_A_ROW} lines were all "
                                                  "refused, one by one)", exc.what) from None
                return
            half = count // 2
            self._deliver(half)
            self._deliver(count - half)
            return
        self.backlog.shift(count)
        self._refused_in_a_row = 0


class LogShipper:
    """Numbers lines and sends them in ordered batches from a background thread.

    Unsent lines wait in a :class:`~.spool.Backlog`: in memory up to ``memory_bytes``, past that (or once the
    API has been away longer than ``retry_seconds``) in ``spool``. At ``close`` the spool holds exactly the
    lines not delivered (after whatever it held before). After ``close``: ``refused`` is the refusal of
    everything that stopped shipping (or None), ``failure`` an internal error of the shipping thread or of a
    reader of the script's output (or None), ``dropped`` how many lines the API refused one by one, ``lost``
    how many lines could be neither kept nor written to the spool (a full disk)."""

    def __init__(self, client: KerutaClient, task_id: str, spool: Path, *, max_lines: int = BATCH_LINES,
                 max_bytes: int = BATCH_BYTES, debug: bool = False, memory_bytes: int = MEMORY_BYTES,
                 retry_seconds: float | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.spool = spool
        self.debug = debug
        self.refused: ApiRejected | None = None
        self.failure: BaseException | None = None
        self.backlog = Backlog(spool, memory_bytes=memory_bytes, retry_seconds=retry_seconds, max_lines=max_lines,
                               clock=clock)
        self.delivery = Delivery(client, task_id, self.backlog, max_lines=max_lines, max_bytes=max_bytes,
                                 budget=self._budget)
        self._clock = clock
        self._closing = threading.Event()
        self._close_deadline = 0.0
        self._thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)
        self._thread.start()

    @property
    def pending_bytes(self) -> int:
        """Bytes (of JSON) of the unsent lines held in memory now; the rest wait in the spool file."""
        return self.backlog.pending_bytes

    @property
    def peak_pending_bytes(self) -> int:
        """The most ``pending_bytes`` has been."""
        return self.backlog.peak_pending_bytes

    @property
    def waiting_in_spool(self) -> int:
        """How many lines wait in the spool file to be taken back and sent."""
        return self.backlog.waiting_in_spool

    @property
    def spooled(self) -> int:
        return self.backlog.spooled

    @property
    def lost(self) -> int:
        return self.backlog.lost

    @property
    def dropped(self) -> int:
        return self.delivery.dropped

    def emit(self, level: str, message: str) -> None:
        self.backlog.add(level, message)

    def close(self, timeout: float) -> int:
        """Flush everything, waiting up to ``timeout`` seconds for the API; the lines that could not be
        delivered are left in the spool. Returns how many lines are in the spool (0 on success)."""
        self._close_deadline = self._clock.now() + timeout
        self._closing.set()
        self.backlog.end()
        self._thread.join(timeout + JOIN_MARGIN_SECONDS)
        self.backlog.collect_queued()
        self.backlog.to_spool()
        return self.backlog.spooled

    def _budget(self) -> float:
        # While the script runs: one attempt per round, so new lines keep being collected;
        # at close: whatever is left of the retry budget.
        return max(0.0, self._close_deadline - self._clock.now()) if self._closing.is_set() else 0.0

    def _run(self) -> None:
        try:
            self._ship()
        except Exception as exc:  # the agent's own bug: the lines left are spooled, the exit code says so
            self.failure = exc
            log.error("internal error while sending log lines: %s: %s", type(exc).__name__, exc,
                      exc_info=self.debug)
        # Nothing more will be sent (refused for good, or the bug above): what the script still prints
        # goes to the spool as it comes, not into memory.
        while self.backlog.open:
            self.backlog.drain(BATCH_SECONDS)
            self.backlog.to_spool()

    def _ship(self) -> None:
        backlog = self.backlog
        backoff = Backoff(SHIP_BACKOFF_INITIAL, SHIP_BACKOFF_CAP)
        while backlog.open or backlog.pending or backlog.waiting_in_spool:
            if backlog.open:
                # Lines that arrive while a batch is in flight form the next batch.
                backlog.drain(0.0 if backlog.pending or backlog.waiting_in_spool else BATCH_SECONDS)
            backlog.take_back()
            if not backlog.pending:
                continue
            try:
                self.delivery.send_next()
            except ApiRejected as exc:  # refused for good: no use sending more
                self.refused = exc
                log.error("keruta API refuses this agent's log lines, no more are sent (kept in %s): %s",
                          self.spool, exc)
                return
            except ApiError:
                backlog.api_down()
                if self._closing.is_set() and self._clock.now() >= self._close_deadline:
                    return
                backoff.pause(self._clock)
                continue
            finally:
                self._report_refused()
            backlog.api_up()
            backoff.reset()

    def _report_refused(self) -> None:
        about_lines, about_reports = self.delivery.refusals()
        for message in about_lines:
            log.error("%s", message)
            self.backlog.add_report(message)
        for message in about_reports:
            log.error("%s (the report of refused lines itself)", message)
