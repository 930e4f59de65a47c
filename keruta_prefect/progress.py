"""A Prefect progress artifact that follows the percentage the agent reports (`keruta-agent progress`)."""

from __future__ import annotations

import contextvars
import threading
import uuid

from prefect import get_run_logger

from keruta_prefect.store import Store
from keruta_prefect.summary import artifact_key

POLL_SECONDS = 1.0  # how often the stored progress is read


class ProgressReporter:
    """A Prefect progress artifact that follows the percentage the agent reports (`keruta-agent progress`).

    The agent reports to the keruta API, which stores it with the task (whichever backend, whichever process
    serves the API). One thread per store and process (:class:`_Poller`) reads the progress of every task being
    waited for in one query a second, and each reporter updates its artifact when its value changes."""

    def __init__(self, store: Store, task_id: str, interval: float = POLL_SECONDS) -> None:
        self.store, self.task_id, self.interval = store, task_id, interval
        self.artifact_id: uuid.UUID | None = None
        self.last: int | None = None
        self._context: contextvars.Context | None = None
        self._lock = threading.Lock()  # the poller's update and the last word at exit, one at a time
        self._said_last = False  # the last word is shown: a poll read before it is stale and never shown

    def show(self, progress: int | None, *, last_word: bool = False) -> None:
        """The artifact shows ``progress``. After the last word (``last_word``, as the wait ends) nothing the
        poller read earlier can replace it."""
        with self._lock:
            if self._said_last:
                return
            self._said_last = last_word
            if progress is None or progress == self.last:
                return
            self._publish(progress)
            self.last = progress

    def _publish(self, progress: int) -> None:
        """The Prefect progress artifact: created on the first value, updated in place after."""
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if self.artifact_id is None:
            created = create_progress_artifact(progress, key=artifact_key(self.task_id) + "-progress",
                                               description=f"progress reported by keruta task {self.task_id}")
            assert isinstance(created, uuid.UUID)  # called from a thread: the id itself, not a coroutine
            self.artifact_id = created
        else:
            update_progress_artifact(self.artifact_id, progress)

    def poll(self, *, last_word: bool = False) -> None:
        self.show(self.store.progress_of([self.task_id]).get(self.task_id), last_word=last_word)

    def update(self, progress: int | None) -> None:
        """From the poller's thread: shown in this reporter's context (its task run and flow run)."""
        if progress is None or progress == self.last or self._context is None:
            return
        try:
            self._context.run(self.show, progress)
        except Exception as exc:  # progress is a courtesy: never let it break the wait
            try:
                self._context.run(get_run_logger().debug, "progress not updated: %s", exc)
            except Exception:
                pass

    def __enter__(self) -> ProgressReporter:
        self._context = contextvars.copy_context()  # the artifact belongs to this task run and flow run
        _Poller.of(self.store, self.interval).add(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        _Poller.of(self.store, self.interval).remove(self)
        try:
            self.poll(last_word=True)  # the last word (e.g. 100) before the wait ends
        except Exception:
            pass


class _Poller:
    """One thread per store (and interval) that reads the progress of every task a reporter follows, in one
    query a second, for as long as there is one: a process waiting for a hundred tasks makes one query a
    second, not a hundred, and a task that ends within the first second costs no poll at all."""

    _all: dict[tuple[int, float], _Poller] = {}
    _guard = threading.Lock()

    def __init__(self, store: Store, interval: float) -> None:
        self.store, self.interval = store, interval
        self.reporters: dict[int, ProgressReporter] = {}
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition(_Poller._guard)

    @classmethod
    def of(cls, store: Store, interval: float) -> _Poller:
        with cls._guard:
            key = (id(store), interval)
            if key not in cls._all:
                cls._all[key] = cls(store, interval)
            return cls._all[key]

    def add(self, reporter: ProgressReporter) -> None:
        with self._changed:
            self.reporters[id(reporter)] = reporter
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="keruta-progress")
                self._thread.start()

    def remove(self, reporter: ProgressReporter) -> None:
        with self._changed:
            self.reporters.pop(id(reporter), None)

    def _loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait(self.interval)
                following = list(self.reporters.values())
                if not following:
                    self._thread = None  # the next add starts a new one
                    return
            try:
                progress = self.store.progress_of({r.task_id for r in following})
            except Exception:
                continue  # the database is away for a moment: the next poll tries again
            for reporter in following:
                reporter.update(progress.get(reporter.task_id))
