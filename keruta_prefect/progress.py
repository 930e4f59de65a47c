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

    The agent reports to the keruta API, which stores it with the task; a thread reads it once a second
    (whichever backend, whichever process serves the API) and updates the artifact when it changes."""

    def __init__(self, store: Store, task_id: str, interval: float = POLL_SECONDS) -> None:
        self.store, self.task_id, self.interval = store, task_id, interval
        self.artifact_id: uuid.UUID | None = None
        self.last: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        progress = self.store.get_task(self.task_id).progress
        if progress is None or progress == self.last:
            return
        if self.artifact_id is None:
            created = create_progress_artifact(progress, key=artifact_key(self.task_id) + "-progress",
                                               description=f"progress reported by keruta task {self.task_id}")
            assert isinstance(created, uuid.UUID)  # called from a thread: the id itself, not a coroutine
            self.artifact_id = created
        else:
            update_progress_artifact(self.artifact_id, progress)
        self.last = progress

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # progress is a courtesy: never let it break the wait
                get_run_logger().debug("progress not updated: %s", exc)

    def __enter__(self) -> ProgressReporter:
        context = contextvars.copy_context()  # the artifact belongs to this task run and flow run
        self._thread = threading.Thread(target=context.run, args=(self._loop,), daemon=True,
                                        name=f"keruta-progress-{self.task_id}")
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self.poll()  # the last word (e.g. 100) before the wait ends
        except Exception:
            pass
