"""Log lines just stored, handed in-process to whoever follows the task (the local backend's wait).

The keruta API stores an agent's lines and publishes them here; a waiting flow follows the task and gets
them at once, without polling the database. The feed is keyed by database and task id, so two Stores
of one database (whichever code path made them) share it, and two databases never mix.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol


class FedLine(Protocol):
    """What a follower reads of a line (keruta_prefect.store.LogLine has these)."""

    level: str
    message: str


class LogFeed:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._followers: dict[tuple[str, str], list[queue.SimpleQueue[FedLine]]] = {}

    @contextmanager
    def follow(self, database: str, task_id: str) -> Iterator[queue.SimpleQueue[FedLine]]:
        """A queue of the task's lines published from now on, until the block ends."""
        key = (database, task_id)
        lines: queue.SimpleQueue[FedLine] = queue.SimpleQueue()
        with self._lock:
            self._followers.setdefault(key, []).append(lines)
        try:
            yield lines
        finally:
            with self._lock:
                followers = self._followers.get(key, [])
                if lines in followers:
                    followers.remove(lines)
                if not followers:
                    self._followers.pop(key, None)

    def publish(self, database: str, task_id: str, lines: Sequence[FedLine]) -> None:
        if not lines:
            return
        with self._lock:
            followers = list(self._followers.get((database, task_id), ()))
        for follower in followers:
            for line in lines:
                follower.put(line)


FEED = LogFeed()
