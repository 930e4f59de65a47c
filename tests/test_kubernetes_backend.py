"""The Kubernetes backend on its own: cancel by label, reattach after a crash, logs across drops,
and many tasks sharing one watch (on the harness cluster, or a real one: tests/targets.py)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from keruta_harness.cluster import Cluster

from keruta_prefect.backends.base import Outcome, RunContext, RunHandle
from keruta_prefect.backends.kubernetes import KubernetesBackend
from keruta_prefect.blocks import seed
from keruta_prefect.flows import keruta_task, stop_flow_run_agents
from keruta_prefect.manifest import job_name
from keruta_prefect.models import Task
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store, TaskRunRow
from tests.conftest import Api
from tests.targets import Target, harness_of
from tests.waiting import Gate, eventually


def settings_for(cluster: Target, api: Api | None = None, **extra: object) -> KerutaSettings:
    values: dict[str, object] = {"image_pull_grace_seconds": 1, "artifacts_mode": "off", **extra}
    return cluster.settings(api_url=api.url if api else "http://keruta-api:8080", **values)


@pytest.mark.usefixtures("prefect_server")
def test_cancel_finds_the_jobs_of_a_flow_run_by_label_and_waits_for_their_pods(
        cluster: Target, api: Api, store: Store) -> None:
    cluster.create_secret("keruta-api-token", {"token": api.token})
    block = f"k8s-{uuid.uuid4().hex[:8]}"
    settings = settings_for(cluster, api)
    seed(settings, name=block)
    task = store.create_task(Task.model_validate({"id": "k-cancel", "script": "echo running\nsleep 120"}))
    backend = KubernetesBackend(settings, store)
    handle = backend.launch(task, RunContext(flow_run_id="flow-run-crashed-before-recording", attempt=1))
    cluster.wait_for(lambda: store.count_logs("k-cancel") > 0, timeout=30, what="the agent to run")

    # No run record exists (the flow died right after creating the Job): the label finds it.
    stopped = stop_flow_run_agents("flow-run-crashed-before-recording", block, backend="kubernetes")
    assert stopped == ["k-cancel"]
    assert cluster.job(handle.name) is None and cluster.pods(job=handle.name) == []
    assert store.get_task("k-cancel").status == "CANCELLED"
    if harness := harness_of(cluster):
        deletes = harness.calls_of("delete", "jobs")
        assert len(deletes) == 1 and deletes[0].name == handle.name


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.harness_only("the script waits on a file on this machine, and the test reads the API server's requests")
def test_a_rerun_after_a_crash_reattaches_to_the_running_job(cluster: Cluster, api: Api, store: Store) -> None:
    cluster.create_secret("keruta-api-token", {"token": api.token})
    block = f"k8s-{uuid.uuid4().hex[:8]}"
    settings = settings_for(cluster, api)
    seed(settings, name=block)
    gate = Gate(cluster.root / "go")
    task = store.create_task(Task.model_validate(
        {"id": "k-crash", "script": f"echo first life\n{gate.wait}\necho done"}))
    backend = KubernetesBackend(settings, store)
    handle = backend.launch(task, RunContext(flow_run_id="crashed-flow-run", attempt=1))
    store.start_run(TaskRunRow(task_id="k-crash", flow_run_id="crashed-flow-run", backend="kubernetes", attempt=1,
                               job_name=handle.name, namespace=handle.namespace, job_uid=handle.uid))
    cluster.wait_for(lambda: store.get_task("k-crash").status == "IN_PROGRESS", timeout=30)
    [pod] = [p["metadata"]["name"] for p in cluster.pods(job=handle.name)]
    # …the flow process died here. A new run of the flow for the same task:
    results: list[object] = []
    threading.Thread(target=lambda: results.append(keruta_task(task_id="k-crash", backend="kubernetes",
                                                               settings_block=block)), daemon=True).start()
    with gate:  # the script goes on only once the new run follows the Pod of the running attempt
        eventually(lambda: [c for c in cluster.calls_of("get", "pods") if c.subresource == "log" and c.name == pod],
                   what="the new run to follow the running Pod's log")
        gate.open()
        [result] = eventually(lambda: results, what="the new run to end")
    assert (result.status, result.attempt) == ("COMPLETED", 1)  # type: ignore[attr-defined]
    assert len(cluster.calls_of("create", "jobs")) == 1  # never a duplicate Job
    [run] = store.runs("k-crash")
    assert run.status == "COMPLETED" and run.finished_at is not None


@pytest.mark.harness_only("a manual kubelet writes the log, and the log stream is cut on purpose")
def test_logs_survive_a_drop_mid_line_without_loss_or_repeats(manual_cluster: Cluster, store: Store) -> None:
    cluster = manual_cluster
    settings = settings_for(cluster)
    task = store.create_task(Task(id="k-logs"))
    backend = KubernetesBackend(settings, store)
    handle = backend.launch(task, RunContext(attempt=1))
    pod = cluster.wait_for_pod(handle.name)["metadata"]["name"]
    seen: list[str] = []
    outcome: list[Outcome] = []
    waiter = threading.Thread(target=lambda: outcome.append(backend.wait(handle, lambda _l, m: seen.append(m))))
    waiter.start()
    cluster.log_drop_after = 3  # the first log stream is cut in the middle of its 4th line
    cluster.log(pod, *[f"line {i}" for i in range(1, 6)], "keruta-agent WARNING retrying the keruta API")
    cluster.run_pod(pod)
    cluster.wait_for(lambda: len(seen) >= 6, what="the first lines")
    cluster.log(pod, *[f"line {i}" for i in range(6, 11)])
    cluster.wait_for(lambda: len(seen) >= 11, what="the rest")
    cluster.finish_pod(pod, 0)
    waiter.join(30)
    assert outcome and outcome[0].status == "COMPLETED"
    assert [m for m in seen if m.startswith("line")] == [f"line {i}" for i in range(1, 11)]
    assert seen.count("keruta-agent WARNING retrying the keruta API") == 1
    stored = [(r.source, r.message) for r in store.logs("k-logs")]
    assert stored == [(f"pod/{pod}", "keruta-agent WARNING retrying the keruta API")]
    assert len(cluster.calls_of("get", "pods")) >= 2  # the log was requested again after the drop


@pytest.mark.harness_only("a manual kubelet ends 50 Pods at once; the watches are counted by the API server")
def test_fifty_tasks_share_one_watch(manual_cluster: Cluster, store: Store) -> None:
    cluster = manual_cluster
    settings = settings_for(cluster)
    backend = KubernetesBackend(settings, store)
    outcomes: dict[str, Outcome] = {}
    handles: list[RunHandle] = []
    lock = threading.Lock()

    def run_one(n: int) -> None:
        task = store.create_task(Task(id=f"many-{n}"))
        handle = backend.launch(task, RunContext(attempt=1))
        with lock:
            handles.append(handle)
        outcomes[task.id] = backend.wait(handle)

    threads = [threading.Thread(target=run_one, args=(n,)) for n in range(50)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    cluster.wait_for(lambda: len(cluster.pods()) == 50, timeout=60, what="50 pods")
    cluster.wait_for(lambda: len(handles) == 50, timeout=30, what="50 launches")
    for pod in cluster.pods():
        cluster.run_pod(pod["metadata"]["name"])
        cluster.finish_pod(pod["metadata"]["name"], 0)
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - start
    assert len(outcomes) == 50 and {o.status for o in outcomes.values()} == {"COMPLETED"}
    # One watch open for the namespace, whatever the number of tasks; it is renewed when the server ends it
    # (every 5 s here), so the count of watch requests follows time, not tasks.
    assert cluster.peak_watches == 1
    assert len(cluster.calls_of("watch", "pods")) <= 1 + elapsed / 5
    assert len(cluster.calls_of("list", "pods")) == 1
    assert elapsed < 60
    assert {h.name for h in handles} == {job_name(f"many-{n}", 1) for n in range(50)}


@pytest.mark.harness_only("the API server's watch is silenced on purpose")
def test_a_silent_watch_is_re_established(manual_cluster: Cluster, store: Store) -> None:
    """The connection stays open but nothing comes (no events, no bookmarks): the read timeout notices."""
    cluster = manual_cluster
    backend = KubernetesBackend(settings_for(cluster), store)
    handle = backend.launch(store.create_task(Task(id="k-silent")), RunContext(attempt=1))
    pod = cluster.wait_for_pod(handle.name)["metadata"]["name"]
    outcome: list[Outcome] = []
    waiter = threading.Thread(target=lambda: outcome.append(backend.wait(handle)))
    waiter.start()
    cluster.wait_for(lambda: cluster.watches(), what="the watch")
    cluster.silence_watches()
    cluster.finish_pod(pod, 0)  # happens while the watch is silent
    waiter.join(30)
    assert outcome and outcome[0].status == "COMPLETED"
    assert len(cluster.calls_of("watch", "pods")) >= 2


@pytest.mark.harness_only("injects 5xx answers to list and watch")
def test_api_server_errors_on_the_watch_are_survived(manual_cluster: Cluster, store: Store) -> None:
    cluster = manual_cluster
    backend = KubernetesBackend(settings_for(cluster), store)
    handle = backend.launch(store.create_task(Task(id="k-5xx")), RunContext(attempt=1))
    pod = cluster.wait_for_pod(handle.name)["metadata"]["name"]
    cluster.fail(2, 500, verb="list", resource="pods")
    cluster.fail(2, 503, verb="watch", resource="pods")
    outcome: list[Outcome] = []
    waiter = threading.Thread(target=lambda: outcome.append(backend.wait(handle)))
    waiter.start()
    cluster.wait_for(lambda: cluster.watches(), timeout=30, what="the watch after the errors")
    cluster.finish_pod(pod, 0)
    waiter.join(30)
    assert outcome and outcome[0].status == "COMPLETED"
    assert len(cluster.calls_of("list", "pods")) == 3 and len(cluster.calls_of("watch", "pods")) >= 3


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.harness_only("a manual kubelet keeps the Pod Pending")
def test_cancel_while_the_pod_is_still_pending(manual_cluster: Cluster, api: Api, store: Store) -> None:
    block = f"k8s-{uuid.uuid4().hex[:8]}"
    settings = settings_for(manual_cluster, api)
    seed(settings, name=block)
    task = store.create_task(Task(id="k-cancel-pending"))
    backend = KubernetesBackend(settings, store)
    handle = backend.launch(task, RunContext(flow_run_id="flow-run-pending", attempt=1))
    store.start_run(TaskRunRow(task_id=task.id, flow_run_id="flow-run-pending", backend="kubernetes", attempt=1,
                               job_name=handle.name, namespace=handle.namespace, job_uid=handle.uid))
    pod = manual_cluster.wait_for_pod(handle.name)
    assert pod["status"]["phase"] == "Pending"  # scheduled nowhere yet

    assert stop_flow_run_agents("flow-run-pending", block, backend="kubernetes") == ["k-cancel-pending"]
    assert manual_cluster.job(handle.name) is None and manual_cluster.pods(job=handle.name) == []
    assert store.get_task(task.id).status == "CANCELLED"
    [run] = store.runs(task.id)
    assert run.status == "CANCELLED" and run.finished_at is not None


@pytest.mark.usefixtures("prefect_server")
def test_cancel_while_the_files_wait_for_collection_keeps_the_reported_status(
        cluster: Target, api: Api, store: Store) -> None:
    """The agent reported COMPLETED and holds its Pod for collection: a cancel now removes the Job; the
    task keeps the status its agent reported (it did complete), and nothing is left running."""
    cluster.create_secret("keruta-api-token", {"token": api.token})
    block = f"k8s-{uuid.uuid4().hex[:8]}"
    settings = settings_for(cluster, api, artifacts_mode="exec", artifacts_hold_timeout=120)
    seed(settings, name=block)
    task = store.create_task(Task.model_validate({"id": "k-cancel-collect", "script": "echo made > out.txt"}))
    backend = KubernetesBackend(settings, store)
    handle = backend.launch(task, RunContext(flow_run_id="flow-run-collect", attempt=1))
    store.start_run(TaskRunRow(task_id=task.id, flow_run_id="flow-run-collect", backend="kubernetes", attempt=1,
                               job_name=handle.name, namespace=handle.namespace, job_uid=handle.uid))
    cluster.wait_for(lambda: store.get_task(task.id).status == "COMPLETED", timeout=60, what="the agent's report")
    assert cluster.pods(job=handle.name)[0]["status"]["phase"] == "Running"  # holding for collection

    assert stop_flow_run_agents("flow-run-collect", block, backend="kubernetes") == ["k-cancel-collect"]
    assert cluster.job(handle.name) is None and cluster.pods(job=handle.name) == []
    assert store.get_task(task.id).status == "COMPLETED"
    [run] = store.runs(task.id)
    assert run.status == "CANCELLED" and run.finished_at is not None
