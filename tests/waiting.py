"""Waiting in tests: for a condition (``eventually``) or for a script to reach a point (``Gate``), never for
a length of time. A test that sleeps "long enough" passes or fails by luck; these end on the event itself
and give up only after a generous timeout, saying what did not happen."""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

TIMEOUT = 60.0  # only ends a test that fails: a condition that holds is seen as soon as it holds
INTERVAL = 0.02  # between two looks


def eventually(condition: Callable[[], T], *, what: str, timeout: float = TIMEOUT, interval: float = INTERVAL,
               context: Callable[[], str] | None = None) -> T:
    """Call ``condition`` until it returns a truthy value (which is returned) without raising AssertionError.

    After ``timeout`` seconds, raises AssertionError saying ``what`` was awaited and the last value (or the
    last assertion, chained), followed by ``context()`` if given (e.g. the tail of a log). Any other
    exception from ``condition`` is raised at once: it is a failure, not a "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        failed: AssertionError | None = None
        try:
            value = condition()
        except AssertionError as exc:
            failed, last = exc, f"last assertion: {exc}" if str(exc) else "last assertion failed"
        else:
            if value:
                return value
            last = f"last value: {value!r}"
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:g}s waiting for {what}; {last}"
            if context is not None:
                message += "\n" + context()
            raise AssertionError(message) from failed
        time.sleep(interval)


def throughout(condition: Callable[[], object], *, what: str, seconds: float, interval: float = INTERVAL) -> None:
    """Assert that ``condition`` holds at every look for ``seconds``: for what must *not* happen (a third task
    starting under a bound of two) and that no event announces. It never fails a system that behaves; a slow
    machine only makes a misbehaviour less likely to show within the window."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = condition()
        except AssertionError as exc:
            raise AssertionError(f"{what} stopped holding: {exc}") from exc
        assert value, f"{what} stopped holding: {value!r}"
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


class Gate:
    """A point where a test's shell script waits until the test lets it on: a named pipe the script reads
    one line from (put ``gate.wait`` in the script), written by ``open()``. The script neither sleeps nor
    polls, and the test knows the script is held there, not merely late.

    As a context manager, its exit leaves the gate open for good, so that a failing test does not leave a
    process behind blocked for ever."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)

    @property
    def wait(self) -> str:
        """The shell line that waits at the gate."""
        return f"read -r _ < {shlex.quote(str(self.path))}"

    def open(self, timeout: float = TIMEOUT) -> None:
        """Let the script on, once it waits at the gate (until then the pipe has no reader)."""
        [fd] = eventually(self._writer, what=f"a script to wait at {self.path.name}", timeout=timeout)
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)

    def _writer(self) -> list[int]:
        try:
            return [os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)]
        except OSError as exc:  # ENXIO: nobody reads the pipe yet
            raise AssertionError(f"no reader at {self.path.name} ({exc.strerror})") from None

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Leave the gate open for good (a failed test must not leave a script waiting there for ever): a
        script waiting now gets its line, one that comes later finds a plain file with the line in it."""
        fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)  # (never blocks: this end reads and writes)
        try:
            passage = self.path.with_name(self.path.name + ".open")
            passage.write_bytes(b"go\n")
            os.replace(passage, self.path)
            os.write(fd, b"go\n")
        finally:
            os.close(fd)
