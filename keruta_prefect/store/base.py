"""What every group of queries stands on: the engine and its sessions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlmodel import Session, select

from keruta_prefect.models import TaskStatus, check_transition
from keruta_prefect.store.database import get_engine
from keruta_prefect.store.tables import TaskNotFound, TaskRow, utcnow


class StoreBase:
    """The engine of one database and its sessions (a reader that never takes SQLite's write lock)."""

    def __init__(self, url: str | None = None) -> None:
        self.engine = get_engine(url)
        self._reader = self.engine.execution_options(keruta_read=True)

    @contextmanager
    def session(self, read: bool = False) -> Iterator[Session]:
        """A session; ``read=True`` for one that only reads (on SQLite it does not take the write lock)."""
        with Session(self._reader if read else self.engine, expire_on_commit=False) as session:
            yield session

    @property
    def database(self) -> str:
        """The database's URL as a key (password hidden), e.g. for keruta_prefect.logfeed."""
        return str(self.engine.url)

    @staticmethod
    def _locked(s: Session, task_id: str) -> TaskRow:
        """The task's row, locked for this transaction (SELECT … FOR UPDATE where the database has it)."""
        row = s.exec(select(TaskRow).where(TaskRow.id == task_id).with_for_update()).first()
        if row is None:
            raise TaskNotFound(task_id)
        return row

    @staticmethod
    def _move(row: TaskRow, status: TaskStatus, *, message: str | None = None, progress: int | None = None,
              error_code: str | None = None) -> None:
        """The one place a task's status changes (InvalidTransition if not allowed). A task that starts
        (again) drops any usage an earlier attempt's agent reported and no run took (see TaskRow.usage)."""
        check_transition(TaskStatus(row.status), status)
        if row.status != status.value:
            row.status = status.value
            row.error_code = error_code
            if status in (TaskStatus.IN_PROGRESS, TaskStatus.PENDING, TaskStatus.RETRYING):
                row.progress = None
                row.usage = None
            if status == TaskStatus.PENDING:
                row.claimed_by = None  # queued again: anyone may claim it
        elif error_code is not None:
            row.error_code = error_code
        if message is not None:
            row.message = message
        if progress is not None:
            row.progress = progress
        row.updated_at = utcnow()
