"""Tasks: create, read, list, and status changes (checked against the allowed transitions)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from keruta_prefect.models import Task, TaskStatus
from keruta_prefect.store.base import StoreBase
from keruta_prefect.store.tables import TaskExists, TaskNotFound, TaskRow


class TaskQueries(StoreBase):
    """Tasks: create, read, list, and status changes (checked against the allowed transitions)."""

    # --- tasks -------------------------------------------------------------------------------------
    def create_task(self, task: Task, claimed_by: str | None = None) -> Task:
        row = TaskRow.from_task(task)
        row.claimed_by = claimed_by
        try:
            with self.session() as s:
                s.add(row)
                s.commit()
        except IntegrityError:
            raise TaskExists(task.id) from None
        return row.to_task()

    def get_or_create_task(self, task: Task, claimed_by: str | None = None) -> tuple[Task, bool]:
        """The stored task of this id, or ``task`` stored now (claimed by ``claimed_by``, if given)."""
        try:
            return self.create_task(task, claimed_by), True
        except TaskExists:
            return self.get_task(task.id), False

    def children(self, task_id: str) -> list[Task]:
        with self.session(read=True) as s:
            return [row.to_task() for row in s.exec(select(TaskRow).where(TaskRow.parent_id == task_id))]

    def get_task(self, task_id: str) -> Task:
        with self.session(read=True) as s:
            row = s.get(TaskRow, task_id)
            if row is None:
                raise TaskNotFound(task_id)
            return row.to_task()

    def progress_of(self, task_ids: Collection[str]) -> dict[str, int | None]:
        """The progress each of these tasks' agents reported last (one query for them all)."""
        if not task_ids:
            return {}
        with self.session(read=True) as s:
            return dict(s.exec(select(TaskRow.id, TaskRow.progress).where(col(TaskRow.id).in_(list(task_ids)))).all())

    def list_tasks(self, status: TaskStatus | None = None, limit: int = 100, offset: int = 0) -> list[Task]:
        with self.session(read=True) as s:
            query = select(TaskRow)
            if status is not None:
                query = query.where(TaskRow.status == status.value)
            query = query.order_by(col(TaskRow.priority).desc(), col(TaskRow.created_at)).offset(offset).limit(limit)
            return [row.to_task() for row in s.exec(query)]

    def namespaces(self) -> set[str]:
        """Every namespace a stored task names (for the reconciler: where its Jobs may be)."""
        with self.session(read=True) as s:
            return {n for n in s.exec(select(TaskRow.namespace).distinct()) if n}

    def set_status(
        self,
        task_id: str,
        status: TaskStatus,
        *,
        message: str | None = None,
        progress: int | None = None,
        error_code: str | None = None,
        usage: dict[str, Any] | None = None,
    ) -> Task:
        """Move a task to ``status`` (InvalidTransition if not allowed). The description is never touched:
        the message is kept in its own column (the original overwrote the description with it). ``usage``
        (models.Usage, camelCase: what the agent measured, with its final status) is kept with the task until
        the attempt's run is finished, in the same transaction as the status: a refused status keeps none."""
        with self.session() as s:
            row = self._locked(s, task_id)
            self._move(row, status, message=message, progress=progress, error_code=error_code)
            if usage is not None:
                row.usage = usage
            s.add(row)
            s.commit()
            return row.to_task()
