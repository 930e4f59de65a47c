"""Log lines: stored once per (task, source, seq), read in order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from keruta_prefect.store.base import StoreBase
from keruta_prefect.store.tables import LogLine, LogRow, TaskNotFound, TaskRow, utcnow


class LogQueries(StoreBase):
    """Log lines: stored once per (task, source, seq), read in order."""

    def add_logs(self, task_id: str, source: str, lines: Sequence[LogLine]) -> int:
        """Store lines; a line already stored (same task, source, seq) is skipped. Returns how many new."""
        return len(self.store_logs(task_id, source, lines))

    def store_logs(self, task_id: str, source: str, lines: Sequence[LogLine]) -> list[LogLine]:
        """Store lines; a line already stored (same task, source, seq) is skipped. Returns the new ones, as
        given (reading them back cost a third of a chatty agent's time)."""
        if not lines:
            return []
        values = [
            {
                "task_id": task_id,
                "source": source,
                "seq": line.seq,
                "level": line.level,
                "message": line.message,
                "ts": line.ts or utcnow(),
            }
            for line in lines
        ]
        dialect = self.engine.dialect.name
        with self.session() as s:
            if s.get(TaskRow, task_id) is None:
                raise TaskNotFound(task_id)
            if dialect == "sqlite":
                stmt = sqlite.insert(LogRow).on_conflict_do_nothing().returning(col(LogRow.seq))
            elif dialect == "postgresql":
                stmt = postgresql.insert(LogRow).on_conflict_do_nothing().returning(col(LogRow.seq))
            else:  # pragma: no cover - other databases: check first (slower, still exactly-once)
                slow = self._add_logs_slow(s, task_id, source, values)
                s.commit()
                return [line for line in lines if line.seq in slow]
            new = set(self._insert_many(s, stmt, values))
            s.commit()
        return [line for line in lines if line.seq in new]

    @staticmethod
    def _insert_many(s: Session, stmt: Any, values: list[dict[str, Any]]) -> list[int]:
        # executemany form: SQLAlchemy's "insertmanyvalues" batches it with one cached statement
        # (9x faster than building a VALUES list per batch) and RETURNING gives the new rows' seqs.
        return [row[0] for row in s.execute(stmt, values)]

    @staticmethod
    def _add_logs_slow(s: Session, task_id: str, source: str, values: list[dict[str, Any]]) -> set[int]:
        """The seqs of the lines that were new (checked one by one)."""
        new: set[int] = set()
        for value in values:
            exists = s.exec(
                select(LogRow.id).where(
                    LogRow.task_id == task_id, LogRow.source == source, LogRow.seq == value["seq"]
                )
            ).first()
            if exists is None:
                s.add(LogRow(**value))
                s.flush()
                new.add(value["seq"])
        return new

    def logs(self, task_id: str, *, after_id: int = 0, limit: int | None = None) -> list[LogRow]:
        with self.session(read=True) as s:
            query = select(LogRow).where(LogRow.task_id == task_id, col(LogRow.id) > after_id)
            query = query.order_by(col(LogRow.id))
            if limit is not None:
                query = query.limit(limit)
            return list(s.exec(query))

    def last_logs(self, task_id: str, count: int) -> list[LogRow]:
        """The task's last ``count`` lines, oldest first (without reading the others)."""
        with self.session(read=True) as s:
            query = select(LogRow).where(LogRow.task_id == task_id).order_by(col(LogRow.id).desc()).limit(count)
            return list(reversed(list(s.exec(query))))

    def count_logs(self, task_id: str) -> int:
        with self.session(read=True) as s:
            return int(s.exec(select(func.count()).select_from(LogRow).where(LogRow.task_id == task_id)).one())
