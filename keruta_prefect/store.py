"""The task store (SQLModel): tasks, task runs, log lines and artifacts.

The one module that talks to the database. SQLite under ``$KERUTA_HOME`` by default;
``KERUTA_DATABASE_URL`` selects another database (e.g. ``postgresql+psycopg://…``).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Column, Engine, Text, UniqueConstraint, event, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from keruta_prefect.errors import PermanentError
from keruta_prefect.models import ArtifactInfo, Task, TaskStatus, check_transition
from keruta_prefect.settings import SettingsError, keruta_home
from keruta_prefect.validation import single_line


def _now() -> datetime:
    return datetime.now(UTC)


class TaskRow(SQLModel, table=True):
    __tablename__ = "keruta_tasks"

    id: str = Field(primary_key=True, max_length=512)
    title: str = ""
    description: str = Field(default="", sa_column=Column(Text, nullable=False))
    priority: int = Field(default=0, index=True)
    status: str = Field(default=TaskStatus.PENDING.value, index=True, max_length=32)
    documents: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    image: str | None = None
    namespace: str | None = None
    additional_env: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    repository_id: str | None = None
    repository_url: str | None = None
    repository_ref: str | None = None
    repository_secret: str | None = None
    parent_id: str | None = Field(default=None, index=True)
    session: str | None = None
    storage_class: str | None = None
    pvc_name: str | None = None
    script: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    timeout_seconds: int | None = None
    resources: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    progress: int | None = None
    message: str | None = Field(default=None, sa_column=Column(Text))
    error_code: str | None = None
    claimed_by: str | None = Field(default=None, max_length=128)  # the flow run that is to run it
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)

    def to_task(self) -> Task:
        data = self.model_dump(exclude={"claimed_by"})
        for key in ("created_at", "updated_at"):
            if data[key].tzinfo is None:  # SQLite drops the zone; everything is stored in UTC
                data[key] = data[key].replace(tzinfo=UTC)
        return Task.model_validate(data)

    @classmethod
    def from_task(cls, task: Task) -> TaskRow:
        data = task.model_dump(mode="json", by_alias=False)
        data["created_at"] = task.created_at
        data["updated_at"] = task.updated_at
        return cls.model_validate(data)


class TaskRunRow(SQLModel, table=True):
    __tablename__ = "keruta_task_runs"

    id: int | None = Field(default=None, primary_key=True)
    task_id: str = Field(index=True, max_length=512)
    flow_run_id: str | None = Field(default=None, index=True)
    backend: str = "local"
    attempt: int = 1
    status: str = TaskStatus.IN_PROGRESS.value
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = Field(default=None, sa_column=Column(Text))
    job_name: str | None = None
    namespace: str | None = None
    job_uid: str | None = None
    pid: int | None = None
    artifacts_note: str | None = Field(default=None, sa_column=Column(Text))
    started_at: datetime = Field(default_factory=_now)
    finished_at: datetime | None = None


class ClaimLeaseRow(SQLModel, table=True):
    """How long a claim holder (a flow run) is known to be working: renewed while it runs (see claims.py)."""

    __tablename__ = "claim_leases"
    owner: str = Field(primary_key=True, max_length=128)
    expires_at: datetime


class LogRow(SQLModel, table=True):
    __tablename__ = "keruta_task_logs"
    __table_args__ = (UniqueConstraint("task_id", "source", "seq", name="uq_keruta_log_line"),)

    id: int | None = Field(default=None, primary_key=True)
    task_id: str = Field(index=True, max_length=512)
    source: str = Field(default="api", max_length=64)
    seq: int
    level: str = Field(default="INFO", max_length=16)
    message: str = Field(sa_column=Column(Text, nullable=False))
    ts: datetime = Field(default_factory=_now)


class ArtifactRow(SQLModel, table=True):
    __tablename__ = "keruta_artifacts"
    __table_args__ = (UniqueConstraint("task_id", "run_id", "path", name="uq_keruta_artifact"),)

    id: int | None = Field(default=None, primary_key=True)
    task_id: str = Field(index=True, max_length=512)
    run_id: int | None = Field(default=None, index=True)
    path: str = Field(sa_column=Column(Text, nullable=False))
    size: int
    sha256: str = Field(max_length=64)
    location: str = Field(sa_column=Column(Text, nullable=False))
    description: str | None = None
    created_at: datetime = Field(default_factory=_now)


class TaskNotFound(PermanentError, LookupError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} not found")
        self.task_id = task_id


class TaskExists(PermanentError, ValueError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} already exists")
        self.task_id = task_id


class LogLine(SQLModel):
    seq: int
    level: str = "INFO"
    message: str
    ts: datetime | None = None


class DatabaseUnavailable(SettingsError):
    """The task database cannot be used; ``str()`` is one line naming the setting and the URL (no password)."""


def database_url() -> str:
    url = os.environ.get("KERUTA_DATABASE_URL")
    if url:
        return url
    home = keruta_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUnavailable(f"KERUTA_HOME={str(home)!r}: cannot create the directory of the task database: "
                                  f"{exc.strerror}") from None
    return f"sqlite:///{home / 'keruta.db'}"


def _shown_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: hide anything that looks like a password all the same
        return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def database_error(exc: BaseException, url: str | None = None) -> DatabaseUnavailable:
    """One line for an error opening or using the database: which setting, its value, what went wrong."""
    url = url or os.environ.get("KERUTA_DATABASE_URL") or f"sqlite:///{keruta_home() / 'keruta.db'}"
    where = (f"KERUTA_DATABASE_URL={_shown_url(url)!r}" if os.environ.get("KERUTA_DATABASE_URL")
             else f"KERUTA_HOME={str(keruta_home())!r} (database {_shown_url(url)!r})")
    if isinstance(exc, NoSuchModuleError):
        why = f"unknown kind of database {make_url(url).drivername!r}; use sqlite:/// or postgresql+psycopg://"
    elif isinstance(exc, ArgumentError | ValueError):
        why = ("not a database URL; e.g. sqlite:////var/lib/keruta/keruta.db or "
               "postgresql+psycopg://user:password@host:5432/keruta")
    elif isinstance(exc, ImportError):
        why = f"its driver is not installed ({exc}); for PostgreSQL: pip install 'keruta-prefect[postgres]'"
    elif isinstance(exc, DBAPIError):
        detail = single_line(str(exc.orig), 300) if exc.orig is not None else type(exc).__name__
        cannot_open = url.startswith("sqlite") and ("unable to open" in detail or "readonly" in detail)
        hint = " (does the directory exist, and may this user write there?)" if cannot_open else ""
        why = f"cannot use the database: {detail}{hint}"
    else:
        why = f"cannot use the database: {single_line(str(exc), 300) or type(exc).__name__}"
    return DatabaseUnavailable(f"{where}: {why}")


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(url: str | None = None) -> Engine:
    """The engine of a database URL, its tables created; DatabaseUnavailable (one line) if it cannot be used."""
    url = url or database_url()
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            try:
                engine = _make_engine(url)
                SQLModel.metadata.create_all(engine)
            except (ArgumentError, ValueError, ImportError, DBAPIError) as exc:
                raise database_error(exc, url) from exc
            _engines[url] = engine
        return engine


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # A write takes the write lock at the start, so read-check-write (status transitions) cannot
            # race; a read only begins (WAL: readers never wait for the writer, nor each other).
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("keruta_read") else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Store:
    """The few queries the rest of keruta-prefect needs. Thread-safe; share one per process."""

    def __init__(self, url: str | None = None) -> None:
        self.engine = get_engine(url)
        self._reader = self.engine.execution_options(keruta_read=True)

    @contextmanager
    def session(self, read: bool = False) -> Iterator[Session]:
        """A session; ``read=True`` for one that only reads (on SQLite it does not take the write lock)."""
        with Session(self._reader if read else self.engine, expire_on_commit=False) as session:
            yield session

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

    def list_tasks(self, status: TaskStatus | None = None, limit: int = 100, offset: int = 0) -> list[Task]:
        with self.session(read=True) as s:
            query = select(TaskRow)
            if status is not None:
                query = query.where(TaskRow.status == status.value)
            query = query.order_by(col(TaskRow.priority).desc(), col(TaskRow.created_at)).offset(offset).limit(limit)
            return [row.to_task() for row in s.exec(query)]

    def set_status(
        self,
        task_id: str,
        status: TaskStatus,
        *,
        message: str | None = None,
        progress: int | None = None,
        error_code: str | None = None,
    ) -> Task:
        """Move a task to ``status`` (InvalidTransition if not allowed). The description is never touched:
        the message is kept in its own column (the original overwrote the description with it)."""
        with self.session() as s:
            row = self._locked(s, task_id)
            self._move(row, status, message=message, progress=progress, error_code=error_code)
            s.add(row)
            s.commit()
            return row.to_task()

    @staticmethod
    def _locked(s: Session, task_id: str) -> TaskRow:
        row = s.exec(select(TaskRow).where(TaskRow.id == task_id).with_for_update()).first()
        if row is None:
            raise TaskNotFound(task_id)
        return row

    @staticmethod
    def _move(row: TaskRow, status: TaskStatus, *, message: str | None = None, progress: int | None = None,
              error_code: str | None = None) -> None:
        """The one place a task's status changes (InvalidTransition if not allowed)."""
        check_transition(TaskStatus(row.status), status)
        if row.status != status.value:
            row.status = status.value
            row.error_code = error_code
            if status in (TaskStatus.IN_PROGRESS, TaskStatus.PENDING, TaskStatus.RETRYING):
                row.progress = None
            if status == TaskStatus.PENDING:
                row.claimed_by = None  # queued again: anyone may claim it
        elif error_code is not None:
            row.error_code = error_code
        if message is not None:
            row.message = message
        if progress is not None:
            row.progress = progress
        row.updated_at = _now()

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
            row.updated_at = _now()
            s.add(row)
            if lease is not None:
                self._lease(s, owner, lease)
            s.commit()
            return row.to_task()

    @staticmethod
    def _lease(s: Session, owner: str, lease: timedelta) -> None:
        found = s.get(ClaimLeaseRow, owner)
        expires = _now() + lease
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

    def pending(self, limit: int = 100) -> list[tuple[Task, str | None]]:
        """PENDING tasks by priority (highest first), then age, with who holds each claim."""
        with self.session(read=True) as s:
            query = (select(TaskRow).where(TaskRow.status == TaskStatus.PENDING.value)
                     .order_by(col(TaskRow.priority).desc(), col(TaskRow.created_at), col(TaskRow.id)).limit(limit))
            return [(row.to_task(), row.claimed_by) for row in s.exec(query)]

    # --- logs --------------------------------------------------------------------------------------
    @property
    def database(self) -> str:
        """The database's URL as a key (password hidden), e.g. for keruta_prefect.logfeed."""
        return str(self.engine.url)

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
                "ts": line.ts or _now(),
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

    # --- runs --------------------------------------------------------------------------------------
    def start_run(self, run: TaskRunRow) -> TaskRunRow:
        with self.session() as s:
            s.add(run)
            s.commit()
            s.refresh(run)
            return run

    def update_run(self, run_id: int, **changes: Any) -> TaskRunRow:
        with self.session() as s:
            run = s.get(TaskRunRow, run_id)
            if run is None:
                raise LookupError(f"task run {run_id} not found")
            for key, value in changes.items():
                setattr(run, key, value)
            s.add(run)
            s.commit()
            s.refresh(run)
            return run

    def unfinished_runs(self, flow_run_id: str) -> list[TaskRunRow]:
        with self.session(read=True) as s:
            query = select(TaskRunRow).where(TaskRunRow.flow_run_id == flow_run_id, TaskRunRow.finished_at == None)  # noqa: E711
            return list(s.exec(query.order_by(col(TaskRunRow.id))))

    def runs(self, task_id: str) -> list[TaskRunRow]:
        with self.session(read=True) as s:
            return list(s.exec(select(TaskRunRow).where(TaskRunRow.task_id == task_id).order_by(col(TaskRunRow.id))))

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


_stores: dict[str, Store] = {}


def get_store(url: str | None = None) -> Store:
    """The process's Store for a database URL (default: KERUTA_DATABASE_URL or the SQLite file); one per
    URL, as its engine (connection pool) is."""
    url = url or database_url()
    with _engines_lock:
        store = _stores.get(url)
    if store is None:
        store = Store(url)
        with _engines_lock:
            store = _stores.setdefault(url, store)
    return store
