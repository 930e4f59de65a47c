"""Which database, and its engine: SQLite under ``$KERUTA_HOME`` by default, ``KERUTA_DATABASE_URL`` for another
(e.g. ``postgresql+psycopg://…``); a database that cannot be used is one line naming the setting."""

from __future__ import annotations

import os
import re
import threading
from typing import Any

from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Column, Engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlmodel import SQLModel, create_engine

from keruta_prefect.settings import SettingsError, keruta_home
from keruta_prefect.validation import single_line


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
POOL_SIZE, POOL_OVERFLOW = 10, 20  # connections an engine keeps, and opens beyond those when busy
POOL_TIMEOUT = 120  # seconds a thread waits for a connection before the store says it cannot be used

def get_engine(url: str | None = None) -> Engine:
    """The engine of a database URL, its tables created; DatabaseUnavailable (one line) if it cannot be used."""
    url = url or database_url()
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            try:
                engine = _make_engine(url)
                SQLModel.metadata.create_all(engine)
                add_missing_columns(engine)
            except (ArgumentError, ValueError, ImportError, DBAPIError) as exc:
                raise database_error(exc, url) from exc
            _engines[url] = engine
        return engine


def add_missing_columns(engine: Engine) -> list[str]:
    """Bring a database an earlier version created up to the tables of this one: columns added since are
    added (every column added after a release is nullable, so the rows already stored stay as they
    were). Nothing is ever dropped or changed. The ``table.column`` names added."""
    existing = inspect(engine)
    missing = [(table, column) for table in SQLModel.metadata.sorted_tables if existing.has_table(table.name)
               for column in table.columns
               if column.name not in {c["name"] for c in existing.get_columns(table.name)}]
    if not missing:
        return []
    for table, column in missing:
        if not column.nullable:
            raise RuntimeError(f"column {table.name}.{column.name} was added as NOT NULL: an existing database "
                               "cannot take it; make it nullable")
        try:
            with engine.begin() as conn:
                Operations(MigrationContext.configure(conn)).add_column(
                    table.name, Column(column.name, column.type, nullable=True))
        except DBAPIError:
            # another process (a second worker starting at the same moment) added it first: fine
            if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                raise
    return [f"{table.name}.{column.name}" for table, column in missing]


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # As many connections as PostgreSQL's, and a wait for one as long as a busy write lock may take
        # (twice its busy_timeout): a thousand tasks in one process queue here rather than fail after 30 s.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, pool_timeout=POOL_TIMEOUT)

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
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW,
                         pool_timeout=POOL_TIMEOUT)
