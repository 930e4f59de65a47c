"""The keruta-task flow's default paths, as a user meets them: one bound on running tasks however they
were started, no script run twice by a reattach, a wait that fails recorded as what happened, a
collection that fails never losing the run, a cancel that finds Jobs in the task's own namespace."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from websocket import WebSocketTimeoutException

from keruta_prefect.backends.base import BackendError
from keruta_prefect.backends.local import LocalBackend, session_processes
from keruta_prefect.blocks import seed
from keruta_prefect.flows import KerutaTaskFailed, keruta_task
from keruta_prefect.models import Task
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store
from tests.waiting import Gate, eventually, throughout

pytestmark = pytest.mark.usefixtures("prefect_server")


def _limit(slots: int) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"keruta-test-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
    return name


def test_the_global_limit_bounds_keruta_task_flow_runs_however_they_were_started(store: Store,
                                                                                   tmp_path: Path) -> None:
    """keruta-task itself holds the slot (the deployed dispatcher hands tasks to keruta-task runs that never
    pass through a pipeline): with one slot, three flow runs started at once never overlap."""
    limit = _limit(1)
    lock = tmp_path / "running"
    gates = {f"gl-one-{i}": Gate(tmp_path / f"gl-one-{i}") for i in range(3)}  # each stays inside until let go
    # mkdir is atomic: a second script inside the critical section at the same time fails with exit 7.
    results: dict[int, object] = {}

    def run(i: int) -> None:
        script = (f'mkdir "{lock}" || {{ echo overlap; exit 7; }}\necho $KERUTA_TASK_ID > "{lock}/who"\n'
                  f'{gates[f"gl-one-{i}"].wait}\nrm "{lock}/who"\nrmdir "{lock}"\necho alone')
        results[i] = keruta_task(task_spec={"id": f"gl-one-{i}", "script": script}, concurrency_limit=limit,
                                 return_state=True)

    def inside() -> str:
        assert not [r.message for i in range(3) for r in store.logs(f"gl-one-{i}") if r.message == "overlap"]
        return (lock / "who").read_text().strip() if (lock / "who").exists() else ""

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    with contextlib.ExitStack() as stack:
        for gate in gates.values():
            stack.enter_context(gate)
        for left in (3, 2, 1):
            who = eventually(inside, what="a run inside the critical section")
            if left == 3:  # one inside, two waiting for the slot: give them the time to start if it did not hold
                throughout(lambda who=who: inside() == who, what=f"{who} alone inside", seconds=5)
            gates[who].open()
            eventually(lambda who=who: inside() != who, what=f"{who} to leave the critical section")
        for thread in threads:
            thread.join(240)
    for i in range(3):
        assert store.get_task(f"gl-one-{i}").status == "COMPLETED", [r.message for r in store.logs(f"gl-one-{i}")]


def test_the_dispatcher_hands_its_limit_to_the_deployed_keruta_task_runs(store: Store) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client

    from keruta_prefect.pipelines import hand_over

    name = f"t-{uuid.uuid4().hex[:6]}"
    keruta_task.to_deployment(name=name).apply()
    store.create_task(Task.model_validate({"id": "handed", "script": "true"}))

    @flow
    def dispatcher() -> list[str]:
        runs = hand_over(store, "dispatcher-x", ["handed"], f"keruta-task/{name}", "local", "default", "my-limit")
        return [run.flow_run_id or "" for run in runs]

    [flow_run_id] = dispatcher()
    with get_client(sync_client=True) as client:
        created = client.read_flow_run(uuid.UUID(flow_run_id))
    assert created.parameters["concurrency_limit"] == "my-limit"
    assert created.parameters["task_id"] == "handed"


ORPHAN_MAKER = textwrap.dedent("""
    import os, sys
    from keruta_prefect.backends.base import RunContext
    from keruta_prefect.backends.local import LocalBackend
    from keruta_prefect.models import Task
    from keruta_prefect.settings import KerutaSettings
    from keruta_prefect.store import TaskRunRow, get_store

    store = get_store()
    task = store.create_task(Task.model_validate({"id": sys.argv[1], "script": sys.argv[2]}))
    handle = LocalBackend(KerutaSettings(), store).launch(task, RunContext(flow_run_id="died", attempt=1))
    store.start_run(TaskRunRow(task_id=task.id, flow_run_id="died", pid=handle.pid, job_name=handle.name,
                               attempt=1))
    print(handle.pid, flush=True)
    sys.stdin.readline()  # the test says when: once the script has really started
    os._exit(0)  # die like a crashed flow process (no cleanup)
""")


def _orphan(tmp_path: Path, task_id: str) -> tuple[int, Path]:
    """A flow process that launched a local agent and died: the agent runs on, its embedded API gone."""
    started, finished = tmp_path / "started", tmp_path / "finished"
    script = f'if [ ! -e "{started}" ]; then touch "{started}"; sleep 60; touch "{finished}"; fi\necho second life'
    with subprocess.Popen([sys.executable, "-c", ORPHAN_MAKER, task_id, script], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as maker:
        assert maker.stdin is not None and maker.stdout is not None and maker.stderr is not None
        line = maker.stdout.readline()
        try:
            assert line, f"the flow process died before launching: {maker.stderr.read()}"
            pid = int(line)
            eventually(started.exists, what="the orphaned agent's script to start")
        finally:
            maker.stdin.close()  # let it die
        assert maker.wait(120) == 0, maker.stderr.read()
    assert session_processes(pid), "the orphaned agent should still run"
    return pid, finished


def test_a_local_orphan_is_stopped_before_a_new_attempt_and_counts_as_one(store: Store, tmp_path: Path) -> None:
    pid, finished = _orphan(tmp_path, "orphaned")
    result = keruta_task(task_id="orphaned")
    assert (result.status, result.attempt) == ("COMPLETED", 2)
    assert session_processes(pid) == []  # stopped, not left to run the script a second time alongside
    first, second = store.runs("orphaned")
    assert (first.status, first.reason) == ("FAILED", "LOST")
    assert "stopped" in (first.message or "") and first.finished_at is not None
    assert (second.attempt, second.status) == (2, "COMPLETED")
    assert not finished.exists()


def test_a_stopped_orphan_uses_up_the_attempts_it_counts_for(store: Store, tmp_path: Path) -> None:
    block = f"one-{uuid.uuid4().hex[:6]}"
    seed(KerutaSettings(task_max_attempts=1), name=block)
    pid, _finished = _orphan(tmp_path, "orphan-once")
    state = keruta_task(task_id="orphan-once", settings_block=block, return_state=True)
    with pytest.raises(KerutaTaskFailed) as failed:
        state.result()
    assert (failed.value.result.status, failed.value.result.reason) == ("FAILED", "LOST")
    assert session_processes(pid) == []
    assert len(store.runs("orphan-once")) == 1  # max-attempts=1: the stopped orphan was the one attempt


def test_a_backend_that_cannot_follow_the_attempt_is_recorded_as_failed_not_cancelled(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[int] = []
    original = LocalBackend.launch

    def launch(self: LocalBackend, task: Task, ctx: object) -> object:
        handle = original(self, task, ctx)  # type: ignore[arg-type]
        launched.append(handle.pid or 0)
        return handle

    def wait(self: LocalBackend, handle: object, on_log: object = None) -> object:
        raise BackendError("watching Pods in team-a: forbidden")

    monkeypatch.setattr(LocalBackend, "launch", launch)
    monkeypatch.setattr(LocalBackend, "wait", wait)
    state = keruta_task(task_spec={"id": "unfollowable", "script": "sleep 60"}, return_state=True)
    with pytest.raises(KerutaTaskFailed) as failed:
        state.result()
    result = failed.value.result
    assert (result.status, result.reason) == ("FAILED", "BACKEND_ERROR")
    assert "forbidden" in (result.message or "")
    [run] = store.runs("unfollowable")
    assert (run.status, run.reason) == ("FAILED", "BACKEND_ERROR")
    assert store.get_task("unfollowable").status == "FAILED"
    assert session_processes(launched[0]) == []  # the agent was not left running unwatched


def test_any_collection_failure_is_recorded_as_artifacts_lost_with_the_run(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def collect(self: LocalBackend, handle: object, dest: Path) -> object:
        raise WebSocketTimeoutException("the exec stream stalled")  # not an OSError: it passed through before

    monkeypatch.setattr(LocalBackend, "collect", collect)
    result = keruta_task(task_spec={"id": "collect-breaks", "script": "echo hi"})
    assert result.status == "COMPLETED"
    assert result.artifacts_note == "artifacts lost: WebSocketTimeoutException: the exec stream stalled"
    [run] = store.runs("collect-breaks")
    assert run.finished_at is not None and run.artifacts_note == result.artifacts_note


def test_cancel_finds_a_job_in_the_tasks_own_namespace_before_its_run_was_recorded(
        cluster: object, api: object, store: Store) -> None:
    from keruta_prefect.backends.base import RunContext
    from keruta_prefect.backends.kubernetes import KubernetesBackend
    from keruta_prefect.flows import stop_flow_run_agents
    from tests.conftest import Api
    from tests.targets import HarnessCluster, RealCluster

    assert isinstance(cluster, HarnessCluster | RealCluster) and isinstance(api, Api)
    cluster.create_namespace("team-a")
    cluster.create_secret("keruta-api-token", {"token": api.token}, namespace="team-a")
    block = f"k8s-{uuid.uuid4().hex[:8]}"
    settings = cluster.settings(api_url=api.url, artifacts_mode="off")
    seed(settings, name=block)
    spec = {"id": "ns-cancel", "namespace": "team-a", "script": "echo running\nsleep 120"}
    task = store.create_task(Task.model_validate(spec))
    handle = KubernetesBackend(settings, store).launch(task, RunContext(flow_run_id="fr-team-a", attempt=1))
    cluster.wait_for(lambda: store.count_logs("ns-cancel") > 0, timeout=30, what="the agent to run")

    stopped = stop_flow_run_agents("fr-team-a", block, backend="kubernetes",
                                   parameters={"task_spec": spec, "backend": "kubernetes"})
    assert stopped == ["ns-cancel"]
    assert cluster.job(handle.name, namespace="team-a") is None
    assert store.get_task("ns-cancel").status == "CANCELLED"


def test_a_claim_held_by_a_flow_run_stuck_in_running_is_taken_over_once_its_lease_ran_out(store: Store) -> None:
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.states import Running, Scheduled

    from keruta_prefect.pipelines import keruta_dispatch

    for task_id in ("stuck", "working", "waiting"):
        store.create_task(Task.model_validate({"id": task_id, "script": "true", "priority": 5}))
    with get_client(sync_client=True) as client:
        # Running in Prefect's eyes, but its process died: nothing renews its lease any more.
        stuck = client.create_flow_run(keruta_task, state=Running())
        working = client.create_flow_run(keruta_task, state=Running())  # running, and renewing
        waiting = client.create_flow_run(keruta_task, state=Scheduled())  # handed a task, waiting for a worker
    assert store.claim("stuck", str(stuck.id), lease=timedelta(0)) is not None
    assert store.claim("working", str(working.id), lease=timedelta(minutes=5)) is not None
    assert store.claim("waiting", str(waiting.id), lease=timedelta(0)) is not None

    result = keruta_dispatch(max_tasks=5, concurrency_limit=None)
    assert result.claimed == ["stuck"]
    assert store.get_task("stuck").status == "COMPLETED"
    assert store.get_task("working").status == store.get_task("waiting").status == "PENDING"


def test_the_claim_rules_hold_for_every_state_and_lease() -> None:
    from datetime import UTC, datetime, timedelta

    from keruta_prefect.claims import holds

    now = datetime(2026, 1, 1, tzinfo=UTC)
    past, future = now - timedelta(seconds=1), now + timedelta(seconds=1)
    for final in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED", None):
        assert not holds(final, future, now)
    assert holds("RUNNING", future, now) and holds("RUNNING", None, now)
    assert not holds("RUNNING", past, now)
    for waiting in ("SCHEDULED", "PENDING", "PAUSED", "CANCELLING"):
        assert holds(waiting, past, now)


def test_a_run_that_needs_no_slot_returns_while_the_limit_is_full_and_leaves_nothing_behind(store: Store) -> None:
    """A run that ends before it needs the slot (here: its task is already COMPLETED) does not wait for
    a full limit, leaves no thread asking for one, and takes no slot."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    limit = _limit(1)
    store.create_task(Task.model_validate({"id": "gl-done", "script": "true"}))
    keruta_task(task_id="gl-done", concurrency_limit=limit)
    assert store.get_task("gl-done").status == "COMPLETED"
    with concurrency(limit, occupy=1, strict=True):  # someone else holds the only slot
        states: list[Any] = []
        threading.Thread(target=lambda: states.append(keruta_task(
            task_id="gl-done", concurrency_limit=limit, return_state=True)), daemon=True).start()
        # It returns while the only slot is held here, so it did not wait for one (it used to: for ever).
        [again] = eventually(lambda: states, what="the run to return while another holds the only slot")
        assert again.is_completed()
        assert not [t for t in threading.enumerate() if t.name == f"keruta-slot-{limit}"]
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0


@pytest.mark.parametrize("name", ["x/y", "a%b", "<p>"])
def test_a_limit_name_prefect_refuses_fails_the_run_in_one_line_before_anything_is_stored(store: Store,
                                                                                         name: str) -> None:
    """The flow parameter is checked as Prefect checks limit names (the UI's form and a deployment's
    parameter schema refuse it too): no traceback, nothing stored or claimed."""
    from prefect.exceptions import ParameterTypeError

    try:
        state = keruta_task(task_spec={"id": "bad-limit", "script": "true"}, concurrency_limit=name,
                            return_state=True)
        message = state.message or ""
        assert state.is_failed()
    except ParameterTypeError as exc:  # a direct call: Prefect refuses the parameters before the run
        message = str(exc)
    assert "concurrency_limit" in message
    assert store.list_tasks() == []


def test_a_limit_with_no_slot_is_waited_on_said_once_then_the_task_runs(store: Store,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A limit set to 0 in the UI pauses keruta tasks: a run waits (and says so in its log), and runs
    when the limit has a slot again, instead of failing with Prefect's 422."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    limit = _limit(0)
    states: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: states.setdefault("state", keruta_task(
        task_spec={"id": "paused-1", "script": "echo ran"}, concurrency_limit=limit, return_state=True)))
    waiter.start()
    eventually(lambda: any("has no slot" in r.getMessage() for r in caplog.records), what="the run to say it waits")
    assert waiter.is_alive() and store.runs("paused-1") == []  # waiting, no agent
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(limit=1))  # "in the UI"
    waiter.join(120)
    assert states["state"].is_completed(), states["state"].message
    assert "ran" in [row.message for row in store.logs("paused-1")]


def test_a_prefect_api_that_does_not_answer_the_slot_request_is_one_line() -> None:
    """Not taken for "no such limit" (whose creation would then raise the client's raw error)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from keruta_prefect.limits import SlotUnavailable, task_slot

    name = f"unanswered-{uuid.uuid4().hex[:6]}"  # (Prefect keeps one acquisition service per limit name)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}), \
            pytest.raises(SlotUnavailable) as raised, task_slot(name, 4):
        pass
    assert f"concurrency_limit={name!r}" in str(raised.value) and "\n" not in str(raised.value)
