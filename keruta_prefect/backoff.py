"""The one backoff policy (standard library only: the agent uses it too).

Every loop that tries again after a failure — the agent's HTTP calls and log shipping, the namespace
watch, log following, attempts of a task — takes its pauses from a :class:`Backoff`: exponential from
``initial`` up to ``cap``, optionally with jitter, reset after a success. Waiting goes through a
:class:`Clock`, so tests drive time instead of sleeping.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol


class Clock(Protocol):
    """Where time comes from: ``now`` (monotonic seconds) and ``wait`` (returns True when ``stop`` was set)."""

    def now(self) -> float: ...

    def wait(self, seconds: float, stop: threading.Event | None = None) -> bool: ...


class SystemClock:
    """The real clock: ``time.monotonic``; waits on ``stop`` (if given) so a stop ends the pause at once."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, seconds: float, stop: threading.Event | None = None) -> bool:
        if stop is not None:
            return stop.wait(max(0.0, seconds))
        if seconds > 0:
            time.sleep(seconds)
        return False


SYSTEM_CLOCK = SystemClock()


@dataclass
class Backoff:
    """Pauses between tries: ``initial``, doubling (``factor``) up to ``cap``.

    ``jitter`` in [0, 1] spreads each pause over ``[pause·(1−jitter/2), pause·(1+jitter/2)]`` so many
    clients that failed together do not come back together. ``reset()`` after a success."""

    initial: float
    cap: float
    factor: float = 2.0
    jitter: float = 0.0
    _current: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ValueError(f"backoff initial={self.initial!r}, cap={self.cap!r}: need 0 < initial <= cap")
        if self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff factor={self.factor!r}, jitter={self.jitter!r}: "
                             "need factor >= 1 and 0 <= jitter <= 1")
        self._current = self.initial

    @property
    def current(self) -> float:
        """The pause the next ``next_delay()`` is based on."""
        return self._current

    def next_delay(self) -> float:
        """The next pause (with jitter), and the one after it grows."""
        delay = self._current
        self._current = min(self._current * self.factor, self.cap)
        if self.jitter:
            delay *= 1 - self.jitter / 2 + random.random() * self.jitter
        return delay

    def reset(self) -> None:
        self._current = self.initial

    def pause(self, clock: Clock = SYSTEM_CLOCK, stop: threading.Event | None = None,
              at_most: float | None = None) -> bool:
        """Wait the next pause (no longer than ``at_most``); True when ``stop`` was set meanwhile."""
        delay = self.next_delay()
        if at_most is not None:
            delay = min(delay, max(0.0, at_most))
        return clock.wait(delay, stop)


def attempt_delay(attempt: int, cap: float = 30.0) -> float:
    """Seconds before attempt ``attempt + 1`` of a task after attempt ``attempt`` failed for a system
    reason: 2, 4, 8 … up to ``cap``."""
    return min(2.0 ** attempt, cap)
