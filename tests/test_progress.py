"""The progress of tasks being waited for: one thread and one query a poll for all of them in a process."""

from __future__ import annotations

import threading
from collections.abc import Collection

from keruta_prefect.models import Task, TaskStatus
from keruta_prefect.progress import ProgressReporter
from keruta_prefect.store import Store
from tests.waiting import eventually


class Shown(ProgressReporter):
    """A reporter that records what its artifact would show (the Prefect artifact is the flows' tests' part)."""

    def __init__(self, store: Store, task_id: str) -> None:
        super().__init__(store, task_id, interval=0.05)
        self.values: list[int] = []

    def _publish(self, progress: int) -> None:
        self.values.append(progress)


class Counted(Store):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.queries: list[set[str]] = []

    def progress_of(self, task_ids: Collection[str]) -> dict[str, int | None]:
        self.queries.append(set(task_ids))
        return super().progress_of(task_ids)


def pollers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "keruta-progress"]


def test_tasks_waited_for_at_once_share_one_thread_and_one_query_a_poll(store: Store) -> None:
    counted = Counted(str(store.engine.url))
    ids = ["prog-a", "prog-b", "prog-c"]
    for task_id in ids:
        counted.create_task(Task(id=task_id))
        counted.set_status(task_id, TaskStatus.IN_PROGRESS)
    reporters = [Shown(counted, task_id) for task_id in ids]
    earlier = set(pollers())  # other tests' pollers (other stores) in this process may still be ending
    for reporter in reporters:
        reporter.__enter__()
    ours = set(pollers()) - earlier
    assert len(ours) == 1
    for value, (task_id, reporter) in enumerate(zip(ids, reporters, strict=True), start=10):
        counted.set_status(task_id, TaskStatus.IN_PROGRESS, progress=value)
        eventually(lambda r=reporter, v=value: r.values == [v], what=f"{task_id} to show {value}")
    assert set(pollers()) - earlier == ours
    assert all(query == set(ids) for query in counted.queries[:3]), counted.queries[:3]  # one query for all three

    counted.set_status("prog-a", TaskStatus.IN_PROGRESS, progress=100)
    reporters[0].__exit__(None, None, None)
    assert reporters[0].values == [10, 100]  # the last word, read as it leaves
    for reporter in reporters[1:]:
        reporter.__exit__(None, None, None)
    eventually(lambda: not any(thread.is_alive() for thread in ours), what="the poller to end with nothing to follow")
    asked = len(counted.queries)
    reporters[1].__enter__()  # a new wait starts it again
    eventually(lambda: len(counted.queries) > asked, what="a new poll")
    reporters[1].__exit__(None, None, None)



def test_a_poll_read_before_the_last_word_never_replaces_it(store: Store) -> None:
    """The poller read 50, the wait ends and shows 100, then the poller's late 50 arrives: 100 stays."""
    store.create_task(Task(id="prog-last"))
    store.set_status("prog-last", TaskStatus.IN_PROGRESS, progress=100)
    reporter = Shown(store, "prog-last")
    reporter.__enter__()
    reporter.__exit__(None, None, None)  # the last word: 100
    reporter.update(50)  # the poller's stale read, after it
    assert reporter.values == [100]
