"""The task store (SQLModel): tasks, task runs, log lines and artifacts.

The one module that talks to the database. SQLite under ``$KERUTA_HOME`` by default;
``KERUTA_DATABASE_URL`` selects another database (e.g. ``postgresql+psycopg://…``).
"""

from __future__ import annotations

from keruta_prefect.store.base import StoreBase
from keruta_prefect.store.claims import ClaimQueries
from keruta_prefect.store.database import (
    DatabaseUnavailable,
    database_error,
    database_url,
    get_engine,
)
from keruta_prefect.store.database import _engines_lock as _engines_lock
from keruta_prefect.store.logs import LogQueries
from keruta_prefect.store.runs import RunQueries
from keruta_prefect.store.tables import (
    ArtifactRow,
    ClaimLeaseRow,
    LogLine,
    LogRow,
    TaskExists,
    TaskNotFound,
    TaskRow,
    TaskRunRow,
)
from keruta_prefect.store.tasks import TaskQueries


class Store(TaskQueries, ClaimQueries, LogQueries, RunQueries):
    """The few queries the rest of keruta-prefect needs, grouped by what they are about. Thread-safe;
    share one per process (``get_store``)."""


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


__all__ = ["ArtifactRow", "ClaimLeaseRow", "DatabaseUnavailable", "LogLine", "LogRow", "Store", "StoreBase",
           "TaskExists", "TaskNotFound", "TaskRow", "TaskRunRow", "database_error", "database_url", "get_engine",
           "get_store"]
