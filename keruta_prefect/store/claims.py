"""Claims: which flow run is to run a PENDING task (a compare-and-set), and their leases."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from keruta_prefect.models import Task, TaskStatus
from keruta_prefect.store.base import StoreBase
from keruta_prefect.store.tables import ClaimLeaseRow, TaskNotFound, TaskRow, utcnow


class ClaimQueries(StoreBase):
    """Claims: which flow run is to run a PENDING task (a compare-and-set), and their leases."""

    # --- claims (who runs a PENDING task) ---------------------------------------------------------
    def claim(self, task_id: str, owner: str, *, replacing: Collection[str | None] = (None,),
              requeue: bool = False, lease: timedelta | None = None) -> Task | None:
        """Make ``owner`` (a flow run) the one that runs this PENDING task, atomically: only if the task
        is PENDING and its claim is ``owner`` already or one of ``replacing`` (None: unclaimed).
        ``requeue`` first moves a FAILED/CANCELLED task back to PENDING in the same transaction.
        Returns the claimed task, or None when someone else holds it (or it is no longer PENDING)."""
        with self.session() as s:
            row = self._locked(s, task_id)
            if requeue and row.status in (TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.RETRYING):
                self._move(row, TaskStatus.PENDING, message="queued again")
            if row.status != TaskStatus.PENDING.value:
                return None
            if row.claimed_by != owner and row.claimed_by not in replacing:
                return None
            row.claimed_by = owner
            row.updated_at = utcnow()
            s.add(row)
            if lease is not None:
                self._lease(s, owner, lease)
            s.commit()
            return row.to_task()

    @staticmethod
    def _lease(s: Session, owner: str, lease: timedelta) -> None:
        found = s.get(ClaimLeaseRow, owner)
        expires = utcnow() + lease
        if found is None:
            s.add(ClaimLeaseRow(owner=owner, expires_at=expires))
        else:
            found.expires_at = expires
            s.add(found)

    def renew_lease(self, owner: str, lease: timedelta) -> None:
        """``owner`` works on: its claims' lease now ends ``lease`` from now."""
        for attempt in range(2):
            try:
                with self.session() as s:
                    self._lease(s, owner, lease)
                    s.commit()
                return
            except IntegrityError:  # created by a claim a moment ago: update it instead
                if attempt:
                    raise

    def lease_of(self, owner: str) -> datetime | None:
        """When ``owner``'s lease ends (UTC), or None if it never had one."""
        with self.session(read=True) as s:
            found = s.get(ClaimLeaseRow, owner)
            if found is None:
                return None
            return found.expires_at if found.expires_at.tzinfo else found.expires_at.replace(tzinfo=UTC)

    def claim_of(self, task_id: str) -> str | None:
        with self.session(read=True) as s:
            row = s.get(TaskRow, task_id)
            if row is None:
                raise TaskNotFound(task_id)
            return row.claimed_by

    def release_claim(self, task_id: str, holder: str) -> bool:
        """Clear the claim on a PENDING task if ``holder`` still holds it (a compare-and-set, for the
        reconciler); whether it was released."""
        with self.session() as s:
            row = self._locked(s, task_id)
            if row.status != TaskStatus.PENDING.value or row.claimed_by != holder:
                return False
            row.claimed_by = None
            row.updated_at = utcnow()
            s.add(row)
            s.commit()
            return True

    def pending(self, limit: int = 100) -> list[tuple[Task, str | None]]:
        """PENDING tasks by priority (highest first), then age, with who holds each claim."""
        with self.session(read=True) as s:
            query = (select(TaskRow).where(TaskRow.status == TaskStatus.PENDING.value)
                     .order_by(col(TaskRow.priority).desc(), col(TaskRow.created_at), col(TaskRow.id)).limit(limit))
            return [(row.to_task(), row.claimed_by) for row in s.exec(query)]
