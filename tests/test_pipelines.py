"""keruta-pipeline and keruta-dispatch on the local backend (and a tree on the Kubernetes harness)."""

from __future__ import annotations

import contextlib
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from keruta_prefect.models import TaskStatus, parse_task_spec
from keruta_prefect.store import Store
from tests.waiting import Gate, eventually, throughout

pytestmark = pytest.mark.usefixtures("prefect_server")


def marking(marks: Path, seconds: float = 0, gate: Gate | None = None) -> str:
    """A script that records when it starts and ends (every run of a task leaves one pair); in between it
    sleeps ``seconds`` or waits at ``gate``."""
    return (f'echo "start $KERUTA_TASK_ID $(date +%s.%N)" >> {marks}\n{gate.wait if gate else f"sleep {seconds}"}\n'
            f'echo "end $KERUTA_TASK_ID $(date +%s.%N)" >> {marks}')


def running(marks: Path) -> list[str]:
    """The tasks whose script has started and not ended, in the order they started."""
    started: list[str] = []
    for line in marks.read_text().splitlines() if marks.exists() else []:
        what, task_id, _when = line.split()
        if what == "start":
            started.append(task_id)
        else:
            started.remove(task_id)
    return started


def read_marks(marks: Path) -> dict[str, list[tuple[float, float]]]:
    starts: dict[str, list[float]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for line in marks.read_text().splitlines():
        what, task_id, when = line.split()
        if what == "start":
            starts.setdefault(task_id, []).append(float(when))
        else:
            spans.setdefault(task_id, []).append((starts[task_id].pop(0), float(when)))
    return spans


def max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def flow_run_of_task_run(task_run_id: Any) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.read_task_run(task_run_id).flow_run_id)


def test_a_pipeline_runs_the_parent_then_its_children_as_child_flow_runs_under_its_concurrency(
        store: Store, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from keruta_prefect import keruta_pipeline

    marks = tmp_path / "marks"
    ids = [f"pl-child-{i}" for i in range(4)]
    gates = {task_id: Gate(tmp_path / task_id) for task_id in ids}  # each child runs until the test lets it end
    states: list[Any] = []
    threading.Thread(target=lambda: states.append(keruta_pipeline(
        parent={"id": "pl-parent", "title": "prepare", "script": marking(marks)},
        children=[{"id": task_id, "script": marking(marks, gate=gates[task_id])} for task_id in ids],
        concurrency=2, concurrency_limit=None, return_state=True)), daemon=True).start()
    with contextlib.ExitStack() as stack:
        for gate in gates.values():
            stack.enter_context(gate)
        for left in (4, 3, 2, 1):  # as many children run at once as the concurrency allows, or as are left
            def at_once(expected: int = min(2, left)) -> list[str]:
                now = running(marks)
                assert len(now) == expected, now
                return now
            first, *_ = eventually(at_once, what=f"{min(2, left)} children running at once")
            if left == 4:  # two held, two waiting: give a third the time to start if the bound did not hold
                throughout(at_once, what="two children at once, no more", seconds=5)
            gates[first].open()
            eventually(lambda ended=first: ended not in running(marks), what=f"{first} to end")
        [state] = eventually(lambda: states, what="the pipeline to end")
    result = state.result()

    assert result.completed and result.counts() == {"COMPLETED": 5}
    assert [c.task_id for c in result.children] == [f"pl-child-{i}" for i in range(4)]
    for child in result.children:
        assert store.get_task(child.task_id).parent_id == "pl-parent"  # children belong to the parent's tree
    spans = read_marks(marks)
    assert {k: len(v) for k, v in spans.items()} == {"pl-parent": 1, **{f"pl-child-{i}": 1 for i in range(4)}}
    parent_end = spans["pl-parent"][0][1]
    assert all(spans[f"pl-child-{i}"][0][0] > parent_end for i in range(4))  # children after the parent
    assert max_overlap([spans[f"pl-child-{i}"][0] for i in range(4)]) == 2  # concurrent, never more than 2

    # Each task is a flow run of keruta-task, a child of the pipeline's flow run.
    pipeline_run = str(state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        for run in result.runs:
            assert run.flow_run_id
            child = client.read_flow_run(uuid.UUID(run.flow_run_id))
            assert child.name == f"keruta-{run.task_id}"
            assert flow_run_of_task_run(child.parent_task_run_id) == pipeline_run


def test_when_the_parent_fails_its_children_are_cancelled_without_running(store: Store, tmp_path: Path) -> None:
    from keruta_prefect import PipelineFailed, keruta_pipeline

    marks = tmp_path / "marks"
    state = keruta_pipeline(parent={"id": "pf-parent", "script": "echo broken >&2\nexit 3"},
                            children=[{"id": f"pf-{x}", "script": marking(marks)} for x in "ab"],
                            concurrency_limit=None, return_state=True)
    assert state.is_failed()
    with pytest.raises(PipelineFailed) as failure:
        state.result()
    result = failure.value.result
    assert result.parent is not None and result.parent.status == "FAILED"
    assert result.parent.result is not None and result.parent.result.reason == "SCRIPT_EXIT_3"
    assert [(c.task_id, c.status) for c in result.children] == [("pf-a", "CANCELLED"), ("pf-b", "CANCELLED")]
    assert store.get_task("pf-a").message == "parent task pf-parent ended FAILED"
    assert not marks.exists()  # no child ran
    assert str(failure.value) == "keruta pipeline: 2 CANCELLED, 1 FAILED"


def test_a_bad_child_spec_is_named_and_nothing_is_stored(store: Store) -> None:
    from keruta_prefect import keruta_pipeline

    state = keruta_pipeline(children=[{"id": "ok-1", "script": "true"}, {"id": "ok-2", "priority": "high"}],
                            concurrency_limit=None, return_state=True)
    assert state.is_failed()
    assert "children[1]" in state.message and "priority" in state.message and "'high'" in state.message
    assert "\n" not in state.message.strip()
    assert store.list_tasks() == []  # the good first child was not stored either


def test_the_global_concurrency_limit_is_created_once_and_an_edit_survives(store: Store) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from keruta_prefect import keruta_pipeline

    name = f"keruta-tasks-{uuid.uuid4().hex[:6]}"
    keruta_pipeline(children=[{"id": "gl-1", "script": "true"}], concurrency_limit=name)
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).limit == 10  # keruta.task.processor.concurrency
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=3))  # "in the UI"
    keruta_pipeline(children=[{"id": "gl-2", "script": "true"}], concurrency_limit=name)
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
        assert limit.limit == 3 and limit.active_slots == 0  # kept, and every slot given back


# --- dispatch ---------------------------------------------------------------------------------------

def add_pending(store: Store, task_id: str, priority: int, script: str) -> None:
    store.create_task(parse_task_spec({"id": task_id, "priority": priority, "script": script}))


def test_claims_are_atomic_under_racing_threads(any_store: Store) -> None:
    """On SQLite and on PostgreSQL."""
    store = any_store
    for i in range(40):
        add_pending(store, f"race-{i:02d}", 0, "true")
    barrier = threading.Barrier(4)
    won: dict[str, list[str]] = {}

    def claimer(name: str) -> None:
        barrier.wait()
        won[name] = [t.id for t, holder in store.pending(100) if store.claim(t.id, name) is not None]

    threads = [threading.Thread(target=claimer, args=(f"d{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [task_id for ids in won.values() for task_id in ids]
    assert sorted(claimed) == [f"race-{i:02d}" for i in range(40)]  # every task exactly once
    assert all(store.claim_of(task_id) == name for name, ids in won.items() for task_id in ids)


def test_two_concurrent_dispatchers_never_run_the_same_task(store: Store, tmp_path: Path) -> None:
    from keruta_prefect import keruta_dispatch

    marks = tmp_path / "marks"
    ids = [f"dsp-{i:02d}" for i in range(10)]
    for i, task_id in enumerate(ids):
        add_pending(store, task_id, i % 3, marking(marks, 0.2))
    results: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def dispatcher(name: str) -> None:
        barrier.wait()
        results[name] = keruta_dispatch(max_tasks=7, concurrency=3, concurrency_limit=None)

    threads = [threading.Thread(target=dispatcher, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    a, b = results["a"], results["b"]
    assert a.dispatcher != b.dispatcher
    assert not set(a.claimed) & set(b.claimed)
    assert sorted(a.claimed + b.claimed) == ids
    assert {k: len(v) for k, v in read_marks(marks).items()} == dict.fromkeys(ids, 1)  # each ran once
    for task_id in ids:
        assert store.get_task(task_id).status == TaskStatus.COMPLETED
        assert len(store.runs(task_id)) == 1


def test_dispatch_takes_the_highest_priority_first_and_skips_live_claims(store: Store) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from keruta_prefect import keruta_dispatch, keruta_task

    add_pending(store, "low", 1, "true")
    add_pending(store, "high", 9, "true")
    add_pending(store, "mid", 5, "true")
    add_pending(store, "held", 20, "true")
    add_pending(store, "orphan", 7, "true")
    with get_client(sync_client=True) as client:
        live = client.create_flow_run(keruta_task, state=Running())  # another flow run that is still running
    assert store.claim("held", str(live.id)) is not None
    assert store.claim("orphan", "a-dispatcher-that-crashed") is not None

    first = keruta_dispatch(max_tasks=2, concurrency_limit=None)
    assert first.claimed == ["high", "orphan"]  # "held" belongs to a live run; a dead run's claim is taken over
    assert [r.status for r in first.runs] == ["COMPLETED", "COMPLETED"]
    second = keruta_dispatch(max_tasks=5, concurrency_limit=None)
    assert second.claimed == ["mid", "low"]
    assert store.get_task("held").status == TaskStatus.PENDING

    # Running the held task by hand is refused in one line while its holder lives.
    state = keruta_task(task_id="held", return_state=True)
    assert state.is_failed()
    assert f"task 'held' is claimed by flow run {live.id}, which is still running" in state.message
    assert store.get_task("held").status == TaskStatus.PENDING


def test_a_parent_on_kubernetes_shares_its_volume_with_the_children_that_follow(store: Store, cluster: Any,
                                                                                api: Any) -> None:
    from keruta_prefect import keruta_pipeline
    from keruta_prefect.blocks import seed
    from tests.targets import harness_of

    cluster.create_secret("keruta-api-token", {"token": api.token})
    block = f"tree-{uuid.uuid4().hex[:8]}"
    seed(cluster.settings(api_url=api.url, artifacts_mode="off"), name=block)
    result = keruta_pipeline(
        parent={"id": "tree-root", "script": "echo from-the-parent > shared.txt"},
        children=[{"id": f"tree-leaf-{i}", "script": "cat shared.txt"} for i in range(2)],
        backend="kubernetes", settings_block=block, concurrency_limit=None)
    assert result.counts() == {"COMPLETED": 3}
    for i in range(2):
        assert "from-the-parent" in [row.message for row in store.logs(f"tree-leaf-{i}")]
    assert not [c for c in cluster.pvcs() if not c["metadata"].get("deletionTimestamp")]  # the volume is gone…
    if harness := harness_of(cluster):
        claims = {c.name for c in harness.calls_of("create", "persistentvolumeclaims")}
        assert len(claims) == 1  # one volume for the tree…
        assert {c.name for c in harness.calls_of("delete", "persistentvolumeclaims")} == claims  # …gone at the end


def test_a_pipeline_runs_every_child_with_the_settings_it_read_and_an_edit_applies_from_the_next(
        store: Store, tmp_path: Path) -> None:
    """The children of a pipeline run with the settings the pipeline read (none of them reads the block again):
    a block made invalid in the UI while the parent runs stops neither it nor its children; the next
    pipeline reads the edit (and says what is wrong, in one line)."""
    from keruta_prefect import keruta_pipeline
    from keruta_prefect.blocks import seed
    from keruta_prefect.settings import KerutaSettings, SettingsError
    from tests.test_cli_errors import ui_edit

    name = f"pl-shared-{uuid.uuid4().hex[:8]}"
    seed(KerutaSettings(), name=name)
    marks, gate = tmp_path / "marks", Gate(tmp_path / "parent")
    prefix = f"pl-sh-{uuid.uuid4().hex[:6]}"
    states: list[Any] = []
    with gate:
        threading.Thread(target=lambda: states.append(keruta_pipeline(
            parent={"id": f"{prefix}-parent", "script": marking(marks, gate=gate)},
            children=[{"id": f"{prefix}-{i}", "script": "true"} for i in range(2)],
            concurrency=2, settings_block=name, concurrency_limit=None, return_state=True)), daemon=True).start()
        eventually(lambda: running(marks) == [f"{prefix}-parent"], what="the parent to run")
        ui_edit("keruta-kubernetes-settings", name, default_namespace="Not A Namespace")
        gate.open()
        [state] = eventually(lambda: states, what="the pipeline to end")
    assert state.result().counts() == {"COMPLETED": 3}

    again = keruta_pipeline(children=[{"id": f"{prefix}-next", "script": "true"}], settings_block=name,
                            concurrency_limit=None, return_state=True)
    assert again.is_failed()
    with pytest.raises(SettingsError, match="default_namespace='Not A Namespace'"):
        again.result()
