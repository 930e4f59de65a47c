"""Many tasks at once in one process (issue 15, part 3), scaled down: what a thousand concurrent tasks
need of the shared client, the shared watch and the harness, each checked on a handful."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import kubernetes.client
from keruta_harness.cluster import PODS, Cluster

from keruta_prefect.backends.kubernetes.client import exec_client
from keruta_prefect.backends.kubernetes.wait import no_pod_read_due
from keruta_prefect.backends.kubernetes.watch import PodBook, WatchTuning


def pod(name: str, job: str | None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"job-name": job} if job else {}}, "status": {}}


def test_an_exec_connects_beside_one_still_connecting() -> None:
    """Execs of many tasks connect side by side: while one exec client is busy connecting (its lock held),
    the next exec gets another client, free at once, not the busy one to wait on."""
    api = kubernetes.client.ApiClient(kubernetes.client.Configuration())
    first, first_lock = exec_client(api)
    assert first is not api  # the shared client's requests stay off the WebSocket
    with first_lock:  # connecting
        second, second_lock = exec_client(api)
        assert second_lock is not first_lock and not second_lock.locked()
        assert second is not first and second is not api
    assert exec_client(api)[1] is first_lock  # reused once free: no new client per call


def test_the_pods_of_a_job_are_found_by_their_job_among_many() -> None:
    """The watch files each Pod under its Job: a Job's Pods in the order they came, a Pod that changes its
    Job label moves, a deleted one leaves, and a Job without Pods is no longer kept."""
    book = PodBook("default", WatchTuning())
    for i in range(50):
        book._dispatch("ADDED", pod(f"other-{i}", f"job-{i}"))
    book._dispatch("ADDED", pod("a-1", "a"))
    book._dispatch("ADDED", pod("a-2", "a"))
    book._dispatch("MODIFIED", {**pod("a-1", "a"), "status": {"phase": "Running"}})
    assert [(p["metadata"]["name"], p["status"]) for p in book.pods_of("a")] == \
        [("a-1", {"phase": "Running"}), ("a-2", {})]  # changed in place, first seen first
    book._dispatch("MODIFIED", pod("a-2", "b"))  # relabelled
    book._dispatch("ADDED", pod("lone", None))  # no Job
    assert [p["metadata"]["name"] for p in book.pods_of("a")] == ["a-1"]
    assert [p["metadata"]["name"] for p in book.pods_of("b")] == ["a-2"]
    book._dispatch("DELETED", pod("a-1", "a"))
    assert book.pods_of("a") == [] and "a" not in book._by_job
    assert len(book._pods) == 52 and sum(len(p) for p in book._by_job.values()) == 51


def test_threads_wait_for_the_pods_of_their_jobs_without_polling(tmp_path: Path) -> None:
    """The harness answers a thread waiting for a Pod when one with that label is written (a thousand
    waiters poll nothing); a wait that times out says so and leaves nothing behind."""
    cluster = Cluster(tmp_path / "cluster", kubelet="manual", validate=False).start()
    try:
        found: dict[str, dict[str, Any] | None] = {}

        def wait(job: str) -> None:
            found[job] = cluster.store.first_labelled(PODS, "default", "job-name", job,
                                                     lambda p: p["status"].get("phase") == "Running", 30)

        waiters = [threading.Thread(target=wait, args=(f"j{i}",)) for i in range(5)]
        for waiter in waiters:
            waiter.start()
        cluster.wait_for(lambda: sum(len(w) for w in cluster.store.awaited.values()) == 5, what="5 waiters")
        for i in range(5):
            made = pod(f"p{i}", f"j{i}")
            made["metadata"]["namespace"] = "default"
            cluster.call(cluster.put(PODS, {**made, "status": {"phase": "Pending"}}))
        assert not found  # not Running yet: still waiting
        for i in range(5):
            cluster.call(cluster.store.patch(PODS, "default", f"p{i}", {"status": {"phase": "Running"}}))
        for waiter in waiters:
            waiter.join(30)
        assert {job: p and p["metadata"]["name"] for job, p in found.items()} == {f"j{i}": f"p{i}" for i in range(5)}
        assert cluster.store.first_labelled(PODS, "default", "job-name", "none", lambda p: True, 0.05) is None
        assert cluster.store.awaited == {}
        assert cluster.wait_for_pod("j3", running=True)["metadata"]["name"] == "p3"  # there already
    finally:
        cluster.stop()


def test_a_job_whose_pod_is_slow_to_come_is_read_less_and_less_often() -> None:
    """A Job whose Pod does not come (a thousand queued at the controller) is read after 10 s, then 20, 40
    and every 60 s: a handful of reads in ten minutes, not sixty."""
    reads, last = [], 0.0
    for now in range(1, 601):
        if no_pod_read_due(now - last, len(reads)):
            reads.append(now)
            last = now
    assert reads[:4] == [11, 32, 73, 134] and len(reads) == 11


def test_a_thousand_threads_wait_for_a_store_connection_rather_than_fail(tmp_path: Path) -> None:
    """SQLite's engine keeps as many connections as PostgreSQL's, and a thread waits for one longer than a
    busy write lock may take (SQLAlchemy's default: 5 + 10 and 30 s, which a thousand tasks exhaust)."""
    from keruta_prefect.store.database import get_engine

    pool: Any = get_engine(f"sqlite:///{tmp_path / 'k.db'}").pool
    assert (pool.size(), pool._max_overflow, pool._timeout) == (10, 20, 120)
