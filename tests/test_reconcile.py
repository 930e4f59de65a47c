"""The reconciler: its rules as a pure planner (a table of cases), then whole passes on the local backend and on
the Kubernetes harness (or a real cluster): orphans deleted, lost tasks failed or queued again, dead claims
released, a dry run that changes nothing, the JSON report, and a pass racing a live run that touches nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keruta_prefect.artifacts import attempt_dir
from keruta_prefect.backends.local import session_processes
from keruta_prefect.cli import main
from keruta_prefect.contract import Reason, TaskStatus
from keruta_prefect.models import RunContext, Task
from keruta_prefect.reconcile import ReconcileReport, reconcile
from keruta_prefect.reconcile.plan import AgentFact, Facts, KubeObject, RunFact, TaskFact, WorkDirFact, plan
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store, TaskRunRow
from tests.conftest import Api
from tests.targets import Target
from tests.waiting import Gate, eventually

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(hours=1)  # past the grace period
NEW = NOW - timedelta(seconds=10)  # within it
LIVE, DONE, GONE = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222", "gone-run"


def job(name: str = "j", *, task: str = "t", flow_run: str | None = DONE, created: datetime = OLD,
        kind: str = "Job", **more: Any) -> KubeObject:
    return KubeObject(kind=kind, name=name, namespace="ns", created=created, task_id=task, flow_run_id=flow_run,
                      attempt=1, **more)  # type: ignore[arg-type]


def task(id_: str = "t", status: TaskStatus = TaskStatus.COMPLETED, **more: Any) -> TaskFact:
    return TaskFact(id=id_, status=status, updated_at=more.pop("updated_at", OLD), namespace="ns", **more)


def facts(**more: Any) -> Facts:
    base: dict[str, Any] = {"now": NOW, "flow_runs": {LIVE: "RUNNING", DONE: "COMPLETED"}, "kube_checked": {"ns"}}
    return Facts(**{**base, **more})


def kinds(found: Facts) -> list[tuple[str, str]]:
    return [(a.kind, a.name) for a in plan(found)]


# --- the rules, pure ------------------------------------------------------------------------------------------

CASES: list[tuple[str, Facts, list[tuple[str, str]]]] = [
    ("a Job of a finished flow run goes", facts(objects=[job()], tasks={"t": task()}), [("delete-job", "j")]),
    ("a Job of a flow run Prefect does not know goes", facts(objects=[job(flow_run=GONE)]), [("delete-job", "j")]),
    ("a Job of a live flow run stays", facts(objects=[job(flow_run=LIVE)]), []),
    ("a Job created within the grace period stays", facts(objects=[job(created=NEW)]), []),
    ("a Job being deleted already is left to it", facts(objects=[job(deleting=True)]), []),
    ("a Job of a task a live flow run names stays (a rerun reattaching to it)",
     facts(objects=[job()], named_by={"t": [LIVE]}), []),
    ("a Job of a task whose attempt a live flow run records stays",
     facts(objects=[job()], runs=[RunFact(id=1, task_id="t", flow_run_id=LIVE, backend="kubernetes")]), []),
    ("a Pod of a Job that is still there goes with its Job",
     facts(objects=[job(), job("p", kind="Pod", owner_job="j")]), [("delete-job", "j")]),
    ("a Pending Pod whose Job is gone goes", facts(objects=[job("p", kind="Pod", owner_job="j")]),
     [("delete-pod", "p")]),
    ("a Pod of a live flow run stays", facts(objects=[job("p", kind="Pod", flow_run=LIVE)]), []),
    ("the volume of a finished tree goes",
     facts(objects=[job("v", kind="PersistentVolumeClaim", task="root", flow_run=None)],
           trees={"root": ["root", "c"]}, tasks={"root": task("root"), "c": task("c", TaskStatus.FAILED)}),
     [("delete-pvc", "v")]),
    ("the volume of a tree with an unfinished task stays",
     facts(objects=[job("v", kind="PersistentVolumeClaim", task="root", flow_run=None)],
           trees={"root": ["root", "c"]}, tasks={"root": task("root"), "c": task("c", TaskStatus.PENDING)}), []),
    ("volumes are kept with pvc-retention=keep",
     facts(objects=[job("v", kind="PersistentVolumeClaim", task="root", flow_run=None)], pvc_retention="keep",
           trees={"root": ["root"]}, tasks={"root": task("root")}), []),
    ("a task whose attempt has no Job and a dead flow run is lost",
     facts(tasks={"t": task(status=TaskStatus.IN_PROGRESS)},
           runs=[RunFact(id=1, task_id="t", flow_run_id=GONE, backend="kubernetes", namespace="ns")]),
     [("fail-lost-task", "t")]),
    ("a task whose Job still runs is not lost",
     facts(tasks={"t": task(status=TaskStatus.IN_PROGRESS)}, objects=[job(flow_run=LIVE)],
           runs=[RunFact(id=1, task_id="t", flow_run_id=GONE, backend="kubernetes", namespace="ns")]), []),
    ("a task whose Job is deleted in this pass is lost with it",
     facts(tasks={"t": task(status=TaskStatus.RETRYING)}, objects=[job(flow_run=GONE)],
           runs=[RunFact(id=1, task_id="t", flow_run_id=GONE, backend="kubernetes", namespace="ns")]),
     [("delete-job", "j"), ("fail-lost-task", "t")]),
    ("nothing is known to be lost in a namespace that could not be listed",
     facts(tasks={"t": task(status=TaskStatus.IN_PROGRESS)}, kube_checked=set(),
           runs=[RunFact(id=1, task_id="t", flow_run_id=GONE, backend="kubernetes", namespace="ns")]), []),
    ("a task changed within the grace period is not lost",
     facts(tasks={"t": task(status=TaskStatus.IN_PROGRESS, updated_at=NEW)},
           runs=[RunFact(id=1, task_id="t", flow_run_id=GONE)]), []),
    ("a lost task is queued again with lost-tasks=requeue while it has attempts left",
     facts(tasks={"t": task(status=TaskStatus.IN_PROGRESS, attempts=1)}, lost_tasks="requeue",
           runs=[RunFact(id=1, task_id="t", flow_run_id=GONE)]), [("requeue-lost-task", "t")]),
    ("...and fails when it has none",
     facts(tasks={"t": task(status=TaskStatus.IN_PROGRESS, attempts=3)}, lost_tasks="requeue",
           runs=[RunFact(id=1, task_id="t", flow_run_id=GONE)]), [("fail-lost-task", "t")]),
    ("a claim of a finished flow run is released",
     facts(tasks={"t": task(status=TaskStatus.PENDING, claimed_by=DONE)}), [("release-claim", "t")]),
    ("a claim of a Running flow run whose lease expired is released",
     facts(tasks={"t": task(status=TaskStatus.PENDING, claimed_by=LIVE, lease_expires=OLD)}),
     [("release-claim", "t")]),
    ("a claim of a Running flow run with its lease is kept",
     facts(tasks={"t": task(status=TaskStatus.PENDING, claimed_by=LIVE, lease_expires=NOW + timedelta(minutes=1))}),
     []),
    ("a claim of a Scheduled flow run is kept however long it waits",
     facts(flow_runs={LIVE: "SCHEDULED"}, tasks={"t": task(status=TaskStatus.PENDING, claimed_by=LIVE,
                                                              lease_expires=OLD)}), []),
    ("a local agent of a dead run is stopped and its task lost; its work directory goes once the run has ended",
     facts(tasks={"t": task(status=TaskStatus.IN_PROGRESS)},
           runs=[RunFact(id=1, task_id="t", flow_run_id=GONE, pid=42)],
           agents=[AgentFact(pid=42, task_id="t", work_dir="/w/t/attempt-1", attempt=1, started=OLD)],
           work_dirs=[WorkDirFact(path="/w/t/attempt-1", task_id="t", attempt=1, modified=OLD)]),
     [("stop-agent", "42"), ("fail-lost-task", "t")]),
    ("the work directory of an ended run is removed",
     facts(tasks={"t": task(status=TaskStatus.FAILED)},
           work_dirs=[WorkDirFact(path="/w/t/attempt-1", task_id="t", attempt=1, modified=OLD)]),
     [("remove-work-dir", "/w/t/attempt-1")]),
    ("the Job of a flow run that crashed within the grace period stays (a rerun reattaches to it)",
     facts(objects=[job(flow_run=DONE)], flow_run_since={DONE: NEW}, tasks={"t": task(status=TaskStatus.IN_PROGRESS)},
           runs=[RunFact(id=1, task_id="t", flow_run_id=DONE, backend="kubernetes", namespace="ns")]), []),
    ("…and goes once the grace period after the crash has passed",
     facts(objects=[job(flow_run=DONE)], flow_run_since={DONE: OLD}, tasks={"t": task(status=TaskStatus.COMPLETED)}),
     [("delete-job", "j")]),
    ("a task whose Job (and so its running Pod) is deleted in this pass is lost in the same pass",
     facts(objects=[job(flow_run=GONE), job("j-pod", kind="Pod", flow_run=GONE, owner_job="j")],
           tasks={"t": task(status=TaskStatus.IN_PROGRESS)},
           runs=[RunFact(id=1, task_id="t", flow_run_id=GONE, backend="kubernetes", namespace="ns")]),
     [("delete-job", "j"), ("fail-lost-task", "t")]),
    ("with Kubernetes off, a task IN_PROGRESS with no recorded attempt and no live flow run is lost",
     facts(kube_enabled=False, kube_checked=set(), tasks={"t": task(status=TaskStatus.IN_PROGRESS)}),
     [("fail-lost-task", "t")]),
    ("with Kubernetes on but not looked at, it is not",
     facts(kube_checked=set(), tasks={"t": task(status=TaskStatus.IN_PROGRESS)}), []),
    ("a local agent of a live run and its work directory stay",
     facts(tasks={"t": task(status=TaskStatus.IN_PROGRESS)},
           runs=[RunFact(id=1, task_id="t", flow_run_id=LIVE, pid=42)],
           agents=[AgentFact(pid=42, task_id="t", work_dir="/w/t/attempt-1", attempt=1, started=OLD)],
           work_dirs=[WorkDirFact(path="/w/t/attempt-1", task_id="t", attempt=1, modified=OLD)]), []),
    ("a fresh work directory no run records yet stays",
     facts(work_dirs=[WorkDirFact(path="/w/t/attempt-1", task_id="t", attempt=1, modified=NEW)]), []),
]


@pytest.mark.parametrize(("found", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_rules(found: Facts, expected: list[tuple[str, str]]) -> None:
    assert kinds(found) == expected


def test_every_action_says_why_naming_the_flow_run_and_the_task() -> None:
    [action] = plan(facts(objects=[job(flow_run=GONE)], tasks={"t": task()}))
    assert action.why == "Job of attempt 1 of task t: its flow run gone-run no longer exists; task t is COMPLETED"
    assert (action.namespace, action.uid) == ("ns", None)


# --- whole passes ----------------------------------------------------------------------------------------------

def later(settings: KerutaSettings) -> datetime:
    """A clock past the grace period (what was made in the test is old enough to be looked at)."""
    return datetime.now(UTC) + timedelta(seconds=settings.reconcile_grace_seconds + 1)


def in_progress(store: Store, task_id: str, **spec: Any) -> Task:
    created = store.create_task(Task.model_validate({"id": task_id, "script": "true", **spec}))
    return store.set_status(created.id, TaskStatus.IN_PROGRESS)


def flow_run_in(state: str) -> str:
    """A flow run that Prefect has, in ``state`` (e.g. a RUNNING one: alive as far as Prefect knows)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import State, StateType

    @flow(name="reconcile-test")
    def placeholder() -> None: ...

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(placeholder, state=State(type=StateType(state)))
    return str(run.id)


LOCAL = KerutaSettings(enabled=False)


@pytest.mark.usefixtures("prefect_server")
def test_lost_tasks_are_failed_or_queued_again_and_dead_claims_released(store: Store) -> None:
    lost = in_progress(store, "lost")
    store.start_run(TaskRunRow(task_id=lost.id, flow_run_id=str(uuid.uuid4()), backend="local"))
    in_progress(store, "requeued")
    store.start_run(TaskRunRow(task_id="requeued", flow_run_id=flow_run_in("CRASHED"), backend="local"))
    running = flow_run_in("RUNNING")
    in_progress(store, "alive")
    store.start_run(TaskRunRow(task_id="alive", flow_run_id=running, backend="local"))
    for task_id, holder in (("claimed-gone", str(uuid.uuid4())), ("claimed-expired", running),
                            ("claimed-live", flow_run_in("SCHEDULED"))):
        store.create_task(Task.model_validate({"id": task_id, "script": "true"}), claimed_by=holder)
    store.renew_lease(running, timedelta(seconds=-1))  # the RUNNING flow run stopped renewing: its lease expired

    report = reconcile(LOCAL, store, now=later(LOCAL))
    assert [(a.kind, a.name, a.outcome) for a in report.actions] == [
        ("fail-lost-task", "lost", "done"), ("fail-lost-task", "requeued", "done"),
        ("release-claim", "claimed-expired", "done"), ("release-claim", "claimed-gone", "done")]
    failed = store.get_task("lost")
    assert (failed.status, failed.error_code) == (TaskStatus.FAILED, Reason.LOST)
    assert failed.message.startswith("the reconciler found the task LOST: task IN_PROGRESS: attempt 1 (local)")
    assert "no longer exists" in failed.message
    [run] = store.runs("lost")
    assert (run.status, run.reason, run.finished_at is not None) == ("FAILED", Reason.LOST, True)
    assert [r.message for r in store.logs("lost")] == [failed.message]  # never silently: in the task's log too
    assert store.get_task("alive").status == TaskStatus.IN_PROGRESS
    assert [store.claim_of(t) for t in ("claimed-gone", "claimed-expired")] == [None, None]
    assert store.claim_of("claimed-live") is not None

    requeue = LOCAL.model_copy(update={"reconcile_lost_tasks": "requeue"})
    store.set_status("requeued", TaskStatus.PENDING)
    store.claim("requeued", "x")
    store.set_status("requeued", TaskStatus.IN_PROGRESS)
    store.start_run(TaskRunRow(task_id="requeued", flow_run_id=str(uuid.uuid4()), backend="local", attempt=2))
    report = reconcile(requeue, store, now=later(requeue))
    assert [(a.kind, a.name) for a in report.actions] == [("requeue-lost-task", "requeued")]
    assert store.get_task("requeued").status == TaskStatus.PENDING
    assert "queued again (attempt 2 of 3)" in (store.get_task("requeued").message or "")


@pytest.mark.usefixtures("prefect_server")
def test_a_temporary_prefect_server_that_knows_none_of_the_flow_runs_is_not_taken_for_their_end(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """PREFECT_API_URL forgotten: a temporary server knows none of the records' flow runs. "Gone" would fail
    every task; they are taken as alive, and the report says why."""
    import keruta_prefect.reconcile.facts as facts_module

    in_progress(store, "elsewhere")
    store.start_run(TaskRunRow(task_id="elsewhere", flow_run_id=str(uuid.uuid4()), backend="local"))
    monkeypatch.setattr(facts_module, "temporary_prefect", lambda: True)
    report = reconcile(LOCAL, store, now=later(LOCAL))
    assert report.actions == [] and store.get_task("elsewhere").status == TaskStatus.IN_PROGRESS
    assert any("is it the Prefect API that ran them?" in w for w in report.warnings), report.warnings
    monkeypatch.setattr(facts_module, "temporary_prefect", lambda: False)  # the server that ran it: gone is gone
    assert [a.kind for a in reconcile(LOCAL, store, now=later(LOCAL)).actions] == ["fail-lost-task"]


@pytest.mark.usefixtures("prefect_server")
def test_a_task_a_rerun_took_up_after_the_facts_were_gathered_is_left_to_it(store: Store) -> None:
    """The planner saw a lost task; before the executor acts, a rerun by id (a live keruta-task flow run
    naming it) takes it up: the rerun keeps it, and its attempt stays open."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    from keruta_prefect.reconcile.facts import Gatherer
    from keruta_prefect.reconcile.plan import plan
    from keruta_prefect.reconcile.run import ActionResult, Executor

    in_progress(store, "rerun")
    store.start_run(TaskRunRow(task_id="rerun", flow_run_id=str(uuid.uuid4()), backend="local"))
    [action] = plan(Gatherer(LOCAL, store, None, later(LOCAL)).gather())
    assert action.kind == "fail-lost-task"

    @flow(name="keruta-task")
    def rerun(task_id: str | None = None) -> None: ...

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(rerun, parameters={"task_id": "rerun"}, state=Running())
        try:
            result = ActionResult(**action.model_dump())
            Executor(LOCAL, store, None).run(result)
        finally:
            client.set_flow_run_state(run.id, Completed(), force=True)
    assert (result.outcome, result.detail) == ("skipped", f"flow run {run.id} runs it now")
    assert store.get_task("rerun").status == TaskStatus.IN_PROGRESS
    assert [r.finished_at for r in store.runs("rerun")] == [None]


@pytest.mark.usefixtures("prefect_server")
def test_a_dry_run_changes_nothing_and_the_cli_prints_the_report_as_json(
        store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    from keruta_prefect.blocks import seed

    store.create_task(Task.model_validate({"id": "c", "script": "true"}), claimed_by=str(uuid.uuid4()))
    block = f"rc-{uuid.uuid4().hex[:8]}"
    seed(LOCAL.model_copy(update={"reconcile_grace_seconds": 0}), name=block)
    assert main(["reconcile", "--dry-run", "--json", "--settings-block", block]) == 0
    report = ReconcileReport.model_validate_json(capsys.readouterr().out)
    assert report.dry_run and [(a.kind, a.name, a.outcome) for a in report.actions] == [
        ("release-claim", "c", "planned")]
    assert store.claim_of("c") is not None
    assert main(["reconcile", "--settings-block", block]) == 0
    out = capsys.readouterr().out
    assert "done     release-claim c: claim on PENDING task c held by flow run" in out
    assert out.splitlines()[-1] == "did: 1 actions"
    assert store.claim_of("c") is None


@pytest.mark.usefixtures("prefect_server")
def test_the_flow_publishes_its_report_as_a_table_artifact(store: Store) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from keruta_prefect.blocks import seed
    from keruta_prefect.reconcile.flow import ARTIFACT_KEY, keruta_reconcile

    store.create_task(Task.model_validate({"id": "f", "script": "true"}), claimed_by=str(uuid.uuid4()))
    block = f"rf-{uuid.uuid4().hex[:8]}"
    seed(LOCAL.model_copy(update={"reconcile_grace_seconds": 0}), name=block)
    state = keruta_reconcile(settings_block=block, return_state=True)
    report = state.result()
    assert [(a.kind, a.name, a.outcome) for a in report.actions] == [("release-claim", "f", "done")]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    [artifact] = [a for a in found if a.key == ARTIFACT_KEY]
    assert artifact.type == "table"
    [row] = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert (row["action"], row["name"], row["outcome"]) == ("release-claim", "f", "done")


def test_a_bad_flag_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["reconcile", "--dry-runn"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- the local backend -----------------------------------------------------------------------------------------

@pytest.fixture
def orphan_agent(store: Store, api: Api, keruta_home: Path) -> Iterator[tuple[int, Path]]:
    """A local agent whose flow process died: its run records a flow run Prefect does not know, and the API it
    reported to is gone."""
    task_ = store.create_task(Task.model_validate({"id": "orphan", "script": "sleep 300"}))
    work = attempt_dir(LOCAL.work_root(), task_.id, 1)
    work.mkdir(parents=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")}, "KERUTA_API_TOKEN": api.token}
    agent = subprocess.Popen([sys.executable, "-m", "keruta_prefect.agent", "run", "--task-id", task_.id,
                              "--api-url", api.url, "--work-dir", str(work), "--artifacts-dir", str(work / "a")],
                             env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        store.start_run(TaskRunRow(task_id=task_.id, flow_run_id=str(uuid.uuid4()), backend="local",
                                   job_name=work.name, pid=agent.pid))
        eventually(lambda: store.get_task(task_.id).status == TaskStatus.IN_PROGRESS, what="the agent to start")
        api.stop()
        yield agent.pid, work
    finally:
        for pid in session_processes(agent.pid):
            os.kill(pid, signal.SIGKILL)
        agent.wait()


@pytest.mark.usefixtures("prefect_server")
def test_a_local_orphan_agent_is_stopped_its_task_lost_and_its_work_directory_removed(
        store: Store, orphan_agent: tuple[int, Path]) -> None:
    pid, work = orphan_agent
    dry = reconcile(LOCAL, store, dry_run=True, now=later(LOCAL))
    assert [(a.kind, a.outcome) for a in dry.actions] == [("stop-agent", "planned"), ("fail-lost-task", "planned")]
    assert session_processes(pid) and work.is_dir() and store.get_task("orphan").status == TaskStatus.IN_PROGRESS
    assert reconcile(LOCAL, store).actions == []  # within the grace period: left alone

    report = reconcile(LOCAL, store, now=later(LOCAL))
    assert [(a.kind, a.name, a.outcome) for a in report.actions] == [
        ("stop-agent", str(pid), "done"), ("fail-lost-task", "orphan", "done")]
    assert not session_processes(pid) and work.is_dir()  # its run has ended now: the next pass removes it
    assert (store.get_task("orphan").status, store.get_task("orphan").error_code) == (TaskStatus.FAILED, Reason.LOST)
    after = reconcile(LOCAL, store, now=later(LOCAL))
    assert [(a.kind, a.name, a.outcome) for a in after.actions] == [("remove-work-dir", str(work), "done")]
    assert not work.exists() and not work.parent.exists()


@pytest.mark.usefixtures("prefect_server")
def test_a_reconcile_racing_a_live_local_run_touches_nothing_of_it(store: Store, tmp_path: Path) -> None:
    from keruta_prefect.flows import keruta_task

    results: list[object] = []
    with Gate(tmp_path / "gate") as gate:
        spec = {"id": "live-local", "script": f"echo started\n{gate.wait}\necho done"}
        threading.Thread(target=lambda: results.append(keruta_task(task_spec=spec)), daemon=True).start()
        eventually(lambda: "started" in [r.message for r in store.logs("live-local")], what="the script to start")
        report = reconcile(LOCAL, store, now=later(LOCAL) + timedelta(days=1))
        assert report.actions == [] and report.looked_at["local agents"] == 1
        gate.open()
        [result] = eventually(lambda: results, what="the run to end")
    assert result.status == TaskStatus.COMPLETED  # type: ignore[attr-defined]


# --- Kubernetes ------------------------------------------------------------------------------------------------

@pytest.fixture
def k8s(cluster: Target, api: Api) -> tuple[Target, KerutaSettings, str]:
    from keruta_prefect.blocks import seed

    cluster.create_secret("keruta-api-token", {"token": api.token})
    settings = cluster.settings(api_url=api.url, artifacts_mode="off", image_pull_grace_seconds=1)
    block = f"rk-{uuid.uuid4().hex[:8]}"
    seed(settings, name=block)
    return cluster, settings, block


def live(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objects if not o["metadata"].get("deletionTimestamp"))


@pytest.mark.usefixtures("prefect_server")
def test_jobs_of_finished_and_gone_flow_runs_and_an_orphan_pending_pod_are_deleted(
        k8s: tuple[Target, KerutaSettings, str], store: Store) -> None:
    import kubernetes.client

    from keruta_prefect.backends.kubernetes import KubernetesBackend
    from keruta_prefect.flows import keruta_task

    cluster, settings, block = k8s
    assert keruta_task(task_spec={"id": "k-done", "script": "true"}, backend="kubernetes",
                       settings_block=block).status == TaskStatus.COMPLETED  # its Job stays (ttl)
    backend = KubernetesBackend(settings, store)
    stuck = store.create_task(Task.model_validate({"id": "k-stuck", "resources": {"cpuRequest": "64"},
                                                   "script": "true"}))
    handle = backend.launch(stuck, RunContext(flow_run_id=str(uuid.uuid4()), attempt=1))
    pod = cluster.wait_for_pod(handle.name)
    assert pod["status"].get("phase", "Pending") == "Pending"  # unschedulable
    kubernetes.client.BatchV1Api(backend.api).delete_namespaced_job(handle.name, cluster.namespace,
                                                                    propagation_policy="Orphan")
    eventually(lambda: cluster.job(handle.name) is None, what="the Job to go, its Pod left behind")
    assert len(cluster.jobs()) == 1 and len(cluster.pods()) == 2

    dry = reconcile(settings, store, dry_run=True, now=later(settings))
    assert [(a.kind, a.outcome) for a in dry.actions] == [("delete-job", "planned"), ("delete-pod", "planned")]
    assert len(cluster.jobs()) == 1 and len(cluster.pods()) == 2  # a dry run changes nothing

    report = reconcile(settings, store, now=later(settings))
    [done_job, orphan_pod] = report.actions
    assert (done_job.kind, done_job.outcome, done_job.task_id) == ("delete-job", "done", "k-done")
    assert "is COMPLETED; task k-done is COMPLETED" in done_job.why
    assert (orphan_pod.kind, orphan_pod.name, orphan_pod.outcome) == ("delete-pod", pod["metadata"]["name"], "done")
    assert "(Pending)" in orphan_pod.why and "no longer exists" in orphan_pod.why
    eventually(lambda: cluster.jobs() == [] and cluster.pods() == [], what="the Job and the Pods to be gone")


@pytest.mark.usefixtures("prefect_server")
def test_the_volume_of_a_finished_task_tree_is_deleted_and_that_of_an_open_one_kept(
        k8s: tuple[Target, KerutaSettings, str], store: Store) -> None:
    from keruta_prefect.backends.kubernetes import KubernetesBackend
    from keruta_prefect.backends.kubernetes.jobs import ensure_pvc
    from keruta_prefect.manifest import build_pvc, pvc_name

    cluster, settings, _block = k8s
    kube = KubernetesBackend(settings, store).kube
    for root, child_status in (("tree-done", TaskStatus.COMPLETED), ("tree-open", TaskStatus.PENDING)):
        parent = in_progress(store, root)
        store.set_status(root, TaskStatus.COMPLETED)
        child = store.create_task(Task.model_validate({"id": f"{root}-c", "parentId": root, "script": "true"}))
        if child_status == TaskStatus.COMPLETED:
            store.set_status(child.id, TaskStatus.IN_PROGRESS)
            store.set_status(child.id, TaskStatus.COMPLETED)
        pvc = build_pvc(parent, settings, RunContext(attempt=1, root_task_id=root, has_children=True))
        assert pvc is not None
        ensure_pvc(kube, cluster.namespace, pvc)
    report = reconcile(settings, store, now=later(settings))
    assert [(a.kind, a.name, a.outcome) for a in report.actions] == [("delete-pvc", pvc_name("tree-done"), "done")]
    assert report.actions[0].why == "volume of task tree tree-done: no task of the tree is unfinished (2 stored)"
    eventually(lambda: live(cluster.pvcs()) == [pvc_name("tree-open")], what="only the open tree's volume left")


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.harness_only("the script waits at a gate (a named pipe) on this machine")
def test_a_reconcile_racing_a_live_kubernetes_run_touches_nothing_of_it(
        k8s: tuple[Target, KerutaSettings, str], store: Store, tmp_path: Path) -> None:
    from keruta_prefect.flows import KerutaTaskFailed, keruta_task

    cluster, settings, block = k8s
    states: list[Any] = []
    gate = Gate(getattr(cluster, "root", tmp_path) / "reconcile-gate")
    spec = {"id": "k-live", "script": f"echo started\n{gate.wait}\necho done"}
    threading.Thread(target=lambda: states.append(keruta_task(task_spec=spec, backend="kubernetes",
                                                              settings_block=block, return_state=True)),
                     daemon=True).start()
    with gate:
        eventually(lambda: "started" in [r.message for r in store.logs("k-live")], what="the script to start")
        report = reconcile(settings, store, now=later(settings) + timedelta(days=1))
        assert report.actions == [] and report.looked_at["Kubernetes objects"] == 2  # its Job and its Pod
        assert live(cluster.jobs()) and all(p["status"].get("phase") == "Running" for p in cluster.pods())
        gate.open()
        [state] = eventually(lambda: states, what="the run to end")
    try:
        result = state.result()
    except KerutaTaskFailed as exc:
        result = exc.result
    assert result.status == TaskStatus.COMPLETED, result
    assert json.loads(report.model_dump_json())["dry_run"] is False
