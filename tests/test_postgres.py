"""The PostgreSQL tier: what concurrency does to the store on a real PostgreSQL server (the store's own
tests also run there, see test_tasks_and_store.py)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from keruta_prefect.models import Task, TaskStatus
from keruta_prefect.store import Store, get_store
from tests.harness.postgres import Postgres


@pytest.fixture
def pg_store(postgres: Postgres, keruta_home: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    name = f"keruta_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    monkeypatch.setenv("KERUTA_DATABASE_URL", postgres.url(name))
    store = get_store()
    assert store.engine.dialect.name == "postgresql"
    return store


def test_racing_claims_on_postgresql_give_every_task_to_exactly_one_claimer(pg_store: Store) -> None:
    for i in range(40):
        pg_store.create_task(Task(id=f"pg-race-{i:02d}"))
    barrier = threading.Barrier(6)
    won: dict[str, list[str]] = {}

    def claimer(name: str) -> None:
        barrier.wait()
        won[name] = [t.id for t, _ in pg_store.pending(100) if pg_store.claim(t.id, name) is not None]

    threads = [threading.Thread(target=claimer, args=(f"d{n}",)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(i for ids in won.values() for i in ids) == [f"pg-race-{i:02d}" for i in range(40)]


@pytest.mark.usefixtures("prefect_server")
def test_twenty_concurrent_flows_record_runs_and_logs_without_loss_or_duplicates(pg_store: Store) -> None:
    from keruta_prefect.flows import keruta_task

    results: dict[str, object] = {}

    def run(i: int) -> None:
        results[f"pg-flow-{i:02d}"] = keruta_task(task_spec={"id": f"pg-flow-{i:02d}", "script": "seq 1 300"})

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
