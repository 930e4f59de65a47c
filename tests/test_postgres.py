"""The PostgreSQL tier: what concurrency does to the store on a real PostgreSQL server (the store's own
tests and the claims race also run there: test_tasks_and_store.py, test_pipelines.py). Many concurrent
flows run on a Prefect server that is itself on PostgreSQL, as in production: on SQLite, Prefect answers
concurrent writes with 503s, and a flow run the client gave up creating made this test depend on luck."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from keruta_harness.postgres import Postgres

from keruta_prefect.models import TaskStatus
from keruta_prefect.store import Store, get_store


@pytest.fixture
def pg_store(postgres: Postgres, keruta_home: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    name = f"keruta_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    monkeypatch.setenv("KERUTA_DATABASE_URL", postgres.url(name))
    store = get_store()
    assert store.engine.dialect.name == "postgresql"
    return store


@pytest.mark.usefixtures("on_prefect_postgres")
def test_twenty_concurrent_flows_record_runs_and_logs_without_loss_or_duplicates(pg_store: Store) -> None:
    from keruta_prefect.flows import keruta_task

    results: dict[str, object] = {}

    def run(i: int) -> None:
        # Without the global limit: this is about the store under 20 concurrent writers (the limit has its own
        # tests; with it, half the flows wait for slots on Prefect's Retry-After of up to 30 s).
        results[f"pg-flow-{i:02d}"] = keruta_task(task_spec={"id": f"pg-flow-{i:02d}", "script": "seq 1 300"},
                                                  concurrency_limit=None)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 20
    for task_id in results:
        assert pg_store.get_task(task_id).status == TaskStatus.COMPLETED
        [run_row] = pg_store.runs(task_id)
        assert run_row.status == "COMPLETED" and run_row.finished_at is not None
        assert [row.message for row in pg_store.logs(task_id)] == [str(n) for n in range(1, 301)]
