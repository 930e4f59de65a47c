"""Task runs (one per attempt) and the artifacts each collected."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlmodel import col, func, select

from keruta_prefect.models import ArtifactInfo
from keruta_prefect.store.base import StoreBase
from keruta_prefect.store.tables import ArtifactRow, TaskRow, TaskRunRow


class RunQueries(StoreBase):
    """Task runs (one per attempt) and the artifacts each collected."""

    # --- runs --------------------------------------------------------------------------------------
    def start_run(self, run: TaskRunRow) -> TaskRunRow:
        with self.session() as s:
            s.add(run)
            s.commit()
            s.refresh(run)
            return run

    def update_run(self, run_id: int, **changes: Any) -> TaskRunRow:
        """Change a run. A run being finished (``finished_at``) takes the usage its agent reported, which
        waited on the task (TaskRow.usage: the agent may report before the run was written), in the same
        transaction; a usage given in ``changes`` wins."""
        with self.session() as s:
            run = s.get(TaskRunRow, run_id)
            if run is None:
                raise LookupError(f"task run {run_id} not found")
            for key, value in changes.items():
                setattr(run, key, value)
            if changes.get("finished_at") is not None and "usage" not in changes:
                task = s.exec(select(TaskRow).where(TaskRow.id == run.task_id).with_for_update()).first()
                if task is not None and task.usage is not None:
                    run.usage = task.usage if run.usage is None else run.usage
                    task.usage = None
                    s.add(task)
            s.add(run)
            s.commit()
            s.refresh(run)
            return run

    def unfinished_runs(self, flow_run_id: str) -> list[TaskRunRow]:
        with self.session(read=True) as s:
            query = select(TaskRunRow).where(TaskRunRow.flow_run_id == flow_run_id, TaskRunRow.finished_at == None)  # noqa: E711
            return list(s.exec(query.order_by(col(TaskRunRow.id))))

    def all_unfinished_runs(self) -> list[TaskRunRow]:
        """Every attempt not recorded as ended, of any flow run (for the reconciler)."""
        with self.session(read=True) as s:
            query = select(TaskRunRow).where(TaskRunRow.finished_at == None)  # noqa: E711
            return list(s.exec(query.order_by(col(TaskRunRow.id))))

    def runs(self, task_id: str) -> list[TaskRunRow]:
        with self.session(read=True) as s:
            return list(s.exec(select(TaskRunRow).where(TaskRunRow.task_id == task_id).order_by(col(TaskRunRow.id))))

    def last_runs(self, since: datetime | None = None, limit: int = 100) -> list[TaskRunRow]:
        """Each task's last run, if it has finished (at or after ``since``), most recently finished first."""
        with self.session(read=True) as s:
            last = select(func.max(TaskRunRow.id)).group_by(col(TaskRunRow.task_id))
            query = select(TaskRunRow).where(col(TaskRunRow.id).in_(last), col(TaskRunRow.finished_at).is_not(None))
            if since is not None:
                query = query.where(col(TaskRunRow.finished_at) >= since)
            return list(s.exec(query.order_by(col(TaskRunRow.finished_at).desc(), col(TaskRunRow.id).desc())
                               .limit(limit)))

    # --- artifacts ---------------------------------------------------------------------------------
    def add_artifacts(self, task_id: str, run_id: int | None, items: Sequence[ArtifactInfo]) -> None:
        if not items:
            return
        with self.session() as s:
            for item in items:
                s.add(ArtifactRow(task_id=task_id, run_id=run_id, **item.model_dump()))
            s.commit()

    def claim_uploads(self, task_id: str, run_id: int) -> list[ArtifactInfo]:
        """The files the agent uploaded through the API (recorded without a run) now belong to ``run_id``."""
        with self.session() as s:
            rows = list(s.exec(select(ArtifactRow).where(ArtifactRow.task_id == task_id,
                                                         ArtifactRow.run_id == None)))  # noqa: E711
            for row in rows:
                row.run_id = run_id
                s.add(row)
            s.commit()
            return [ArtifactInfo(path=r.path, size=r.size, sha256=r.sha256, location=r.location) for r in rows]

    def artifacts(self, task_id: str) -> list[ArtifactRow]:
        with self.session(read=True) as s:
            query = select(ArtifactRow).where(ArtifactRow.task_id == task_id).order_by(col(ArtifactRow.id))
            return list(s.exec(query))
