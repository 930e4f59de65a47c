"""The keruta-task flow on the Kubernetes backend, against the harness cluster (kmock + a kubelet that
really runs keruta-agent against a real keruta API on loopback) or a real cluster (tests/targets.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from keruta_harness.cluster import Cluster

from keruta_prefect.blocks import seed
from keruta_prefect.flows import KerutaTaskFailed, keruta_task
from keruta_prefect.manifest import job_name
from keruta_prefect.store import Store
from tests.conftest import Api
from tests.targets import Target, harness_of, job_complete
from tests.waiting import Gate, eventually

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def k8s(cluster: Target, api: Api) -> tuple[Target, str]:
    """A cluster with the token Secret, and a settings block pointing at it and at the keruta API."""
    cluster.create_secret("keruta-api-token", {"token": api.token})
    name = f"k8s-{uuid.uuid4().hex[:8]}"
    seed(cluster.settings(api_url=api.url, image_pull_grace_seconds=1, crash_loop_back_off_timeout_ms=1000,
                          artifacts_mode="off"), name=name)
    return cluster, name


def run(block: str, spec: dict[str, object]) -> object:
    return keruta_task(task_spec=spec, backend="kubernetes", settings_block=block, return_state=True)


def result_of(state: object) -> object:
    try:
        return state.result()  # type: ignore[attr-defined]
    except KerutaTaskFailed as exc:
        return exc.result


def test_a_task_runs_as_a_job_and_completes_with_its_logs(k8s: tuple[Target, str], store: Store) -> None:
    cluster, block = k8s
    state = run(block, {"id": "k-ok", "title": "on k8s", "script": "echo hello from the pod\necho second >&2"})
    result = result_of(state)
    assert (result.status, result.exit_code, result.backend) == ("COMPLETED", 0, "kubernetes")
    assert result.job_name == job_name("k-ok", 1) and result.namespace == cluster.namespace
    [run_row] = store.runs("k-ok")
    assert run_row.job_uid and run_row.job_name == job_name("k-ok", 1)
    agent_lines = [r.message for r in store.logs("k-ok") if r.source.startswith("agent-")]
    assert sorted(agent_lines) == ["hello from the pod", "second"]
    [job] = cluster.jobs()
    assert job["metadata"]["labels"]["keruta.io/task-id"] == "k-ok"
    assert job["metadata"]["labels"]["keruta.io/flow-run-id"] == run_row.flow_run_id
    if harness := harness_of(cluster):  # what only the harness records
        assert not harness.validation_errors
        requests = [c for c in harness.calls if c.resource in ("jobs", "pods", "persistentvolumeclaims")]
        assert len(requests) <= 6, requests


def test_a_failing_script_fails_without_retry(k8s: tuple[Target, str], store: Store) -> None:
    _cluster, block = k8s
    result = result_of(run(block, {"id": "k-fail", "script": "echo nope\nexit 5"}))
    assert (result.status, result.reason, result.exit_code) == ("FAILED", "SCRIPT_EXIT_5", 1)
    assert len(store.runs("k-fail")) == 1


@pytest.mark.harness_only("the pull failure is the harness kubelet's (its answer on a real cluster depends on the "
                          "registry: ErrImagePull first, then ImagePullBackOff)")
def test_an_image_that_cannot_be_pulled_fails_fast_and_is_not_retried(k8s: tuple[Cluster, str], store: Store) -> None:
    cluster, block = k8s
    cluster.unpullable.add("registry.example.com/missing:1")
    result = result_of(run(block, {"id": "k-pull", "image": "registry.example.com/missing:1", "script": "true"}))
    assert (result.status, result.reason) == ("FAILED", "ImagePullBackOff")
    assert "registry.example.com/missing:1 cannot be pulled" in result.message
    assert "image-pull-secrets" in result.message
    assert len(store.runs("k-pull")) == 1


def test_a_missing_token_secret_is_named(cluster: Target, api: Api, store: Store) -> None:
    block = f"k8s-{uuid.uuid4().hex[:8]}"
    seed(cluster.settings(api_url=api.url, image_pull_grace_seconds=1, artifacts_mode="off"), name=block)
    result = result_of(run(block, {"id": "k-secret", "script": "true"}))
    assert (result.status, result.reason) == ("FAILED", "CreateContainerConfigError")
    assert 'secret "keruta-api-token" not found' in result.message and "kubectl create secret" in result.message


def test_a_wrong_token_is_an_agent_configuration_error_that_fails_the_job_at_once(
        cluster: Target, api: Api, store: Store) -> None:
    cluster.create_secret("keruta-api-token", {"token": "not-the-token"})
    block = f"k8s-{uuid.uuid4().hex[:8]}"
    seed(cluster.settings(api_url=api.url, artifacts_mode="off"), name=block)
    result = result_of(run(block, {"id": "k-token", "script": "true"}))
    assert (result.status, result.reason, result.exit_code) == ("FAILED", "AGENT_CONFIG_ERROR", 2)
    assert len(store.runs("k-token")) == 1


def test_an_unschedulable_pod_fails_naming_the_resource(k8s: tuple[Target, str], store: Store) -> None:
    _cluster, block = k8s
    result = result_of(run(block, {"id": "k-big", "resources": {"cpuRequest": "64"}, "script": "true"}))
    assert (result.status, result.reason) == ("FAILED", "Unschedulable")
    assert "Insufficient cpu" in result.message


@pytest.mark.harness_only("the OOM kill is the harness kubelet's fault injection")
def test_oom_killed_is_reported_with_the_limit(k8s: tuple[Cluster, str], api: Api, store: Store) -> None:
    cluster, _block = k8s
    import threading

    block = f"k8s-{uuid.uuid4().hex[:8]}"  # OOM retries off: this one attempt ends the task (see test_retries.py)
    seed(cluster.settings(api_url=api.url, artifacts_mode="off", task_retry_oom_memory_factor="off"), name=block)

    name = job_name("k-oom", 1)

    def kill_when_running() -> None:
        pod = cluster.wait_for(lambda: next((p for p in cluster.pods(job=name)
                                             if p.get("status", {}).get("phase") == "Running"), None), timeout=30)
        cluster.wait_for(lambda: store.count_logs("k-oom") > 0, timeout=30)
        cluster.oom_kill(pod["metadata"]["name"])

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    result = result_of(run(block, {"id": "k-oom", "script": "echo allocating\nsleep 60"}))
    killer.join()
    assert (result.status, result.reason, result.exit_code) == ("FAILED", "OOMKilled", 137)
    assert "limit 1Gi" in result.message
    assert len(store.runs("k-oom")) == 1


@pytest.mark.harness_only("the eviction is injected, and the script waits on a marker file on this machine")
def test_an_evicted_pod_is_replaced_and_the_task_completes(k8s: tuple[Cluster, str], store: Store) -> None:
    cluster, block = k8s
    import threading

    name = job_name("k-evict", 1)
    marker = cluster.root / "evicted-once"

    def evict_first_pod() -> None:
        pod = cluster.wait_for(lambda: next((p for p in cluster.pods(job=name)
                                             if p.get("status", {}).get("phase") == "Running"), None), timeout=30)
        cluster.wait_for(lambda: store.count_logs("k-evict") > 0, timeout=30)
        marker.touch()
        cluster.evict(pod["metadata"]["name"])

    evictor = threading.Thread(target=evict_first_pod)
    evictor.start()
    script = f'echo started\nif [ ! -e "{marker}" ]; then sleep 60; fi\necho finished'
    result = result_of(run(block, {"id": "k-evict", "script": script}))
    evictor.join()
    assert result.status == "COMPLETED"
    assert len(cluster.pods(job=name)) == 2  # the evicted Pod and its replacement
    assert len(store.runs("k-evict")) == 1  # Kubernetes replaced the Pod within the same attempt


def test_a_job_deleted_by_someone_else_fails_the_task_clearly(k8s: tuple[Target, str], store: Store) -> None:
    cluster, block = k8s
    import threading

    name = job_name("k-gone", 1)

    def delete_when_running() -> None:
        cluster.wait_for(lambda: store.count_logs("k-gone") > 0, timeout=30)
        cluster.delete_job(name)

    deleter = threading.Thread(target=delete_when_running)
    deleter.start()
    result = result_of(run(block, {"id": "k-gone", "script": "echo working\nsleep 60"}))
    deleter.join()
    assert (result.status, result.reason) == ("FAILED", "JOB_DELETED")
    assert "deleted by someone else" in result.message


@pytest.mark.harness_only("expires and drops the API server's watches, and counts them")
def test_watch_expiry_and_drops_mid_run_are_survived(k8s: tuple[Cluster, str], store: Store) -> None:
    cluster, block = k8s
    import threading

    gate = Gate(cluster.root / "disturbed")  # the script ends only after both disturbances
    states: list[object] = []
    spec = {"id": "k-410", "script": f"echo one\n{gate.wait}\necho two"}
    threading.Thread(target=lambda: states.append(run(block, spec)), daemon=True).start()
    with gate:
        eventually(lambda: store.count_logs("k-410") > 0, what="the script's first line")
        cluster.expire_watches()  # 410 Gone: relist
        eventually(lambda: len(cluster.calls_of("watch", "pods")) >= 2 and cluster.watches()
                   and not any(s.expire for s in cluster.watches()), what="a new watch after the 410")
        cluster.drop_watches()  # connection reset: resume
        eventually(lambda: len(cluster.calls_of("watch", "pods")) >= 3, what="the watch to resume after the drop")
        gate.open()
        [state] = eventually(lambda: states, what="the run to end")
    result = result_of(state)
    assert result.status == "COMPLETED"
    watches = cluster.calls_of("watch", "pods")
    assert len(watches) >= 3  # first, after 410 (with a relist), after the drop


@pytest.mark.harness_only("injects 503s into the API server and counts its requests")
def test_api_server_errors_on_create_are_retried(k8s: tuple[Cluster, str], store: Store) -> None:
    cluster, block = k8s
    cluster.fail(2, 503, verb="create", resource="jobs")
    result = result_of(run(block, {"id": "k-503", "script": "echo ok"}))
    assert result.status == "COMPLETED"
    assert len(cluster.calls_of("create", "jobs")) == 3
    assert len(cluster.jobs()) == 1


def test_kubernetes_disabled_fails_at_once(cluster: Target, api: Api, store: Store) -> None:
    block = f"k8s-{uuid.uuid4().hex[:8]}"
    seed(cluster.settings(enabled=False), name=block)
    state = run(block, {"id": "k-off", "script": "true"})
    assert state.is_failed()
    assert state.message == "Kubernetes integration is disabled (keruta.kubernetes.enabled=false)"
    assert store.list_tasks() == [] and cluster.jobs() == []
    if harness := harness_of(cluster):
        assert harness.calls_of("create") == []


def test_a_repository_is_cloned_and_a_child_task_shares_the_volume(k8s: tuple[Target, str], store: Store) -> None:
    cluster, block = k8s
    url = cluster.git_remote("team/app", {"README": "hello repo\n"})
    from keruta_prefect.models import Task

    def live_claims() -> list[str]:
        return [c["metadata"]["name"] for c in cluster.pvcs() if not c["metadata"].get("deletionTimestamp")]

    # The child is known before the parent finishes, so the tree is not done and its volume stays.
    store.create_task(Task.model_validate({"id": "k-child", "parentId": "k-parent", "repositoryUrl": url,
                                           "script": "cat shared.txt"}))
    parent = result_of(run(block, {"id": "k-parent", "repositoryUrl": url,
                                   "script": "cat README\necho from-parent > shared.txt"}))
    assert parent.status == "COMPLETED"
    [volume] = live_claims()  # the tree goes on
    child = result_of(keruta_task(task_id="k-child", backend="kubernetes", settings_block=block,
                                  return_state=True))
    assert child.status == "COMPLETED"
    assert [r.message for r in store.logs("k-parent") if r.source.startswith("agent-")] == ["hello repo"]
    assert [r.message for r in store.logs("k-child") if r.source.startswith("agent-")] == ["from-parent"]
    assert live_claims() == []  # …deleted when the tree is done
    if harness := harness_of(cluster):
        claims = harness.calls_of("create", "persistentvolumeclaims")
        assert [c.name for c in claims] == [volume, volume]  # one volume for the tree, asked for by each task
        assert [c.name for c in harness.calls_of("delete", "persistentvolumeclaims")] == [volume]


def test_a_failing_clone_fails_the_task_as_an_init_failure(k8s: tuple[Target, str], store: Store) -> None:
    _cluster, block = k8s
    result = result_of(run(block, {"id": "k-clone", "repositoryUrl": "https://git.example.com/nowhere.git",
                                   "script": "true"}))
    assert (result.status, result.reason) == ("FAILED", "INIT_FAILED")
    assert "init container clone failed" in result.message


def test_a_job_name_taken_by_something_else_is_a_clear_error(k8s: tuple[Target, str], store: Store) -> None:
    cluster, block = k8s
    namespace = cluster.namespace
    stranger = {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": job_name("k-name", 1), "namespace": namespace, "labels": {"app": "other"}},
                "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never",
                                                                "containers": [{"name": "c", "image": "busybox:1"}]}}}}
    cluster.create_job(stranger)
    state = run(block, {"id": "k-name", "script": "true"})
    assert state.is_failed()
    assert f"a Job named {job_name('k-name', 1)} already exists in namespace {namespace} and is not attempt 1" \
        in state.message


def test_files_are_collected_from_the_holding_agent_and_the_pod_then_completes(
        cluster: Target, api: Api, store: Store) -> None:
    cluster.create_secret("keruta-api-token", {"token": api.token})
    block = f"k8s-{uuid.uuid4().hex[:8]}"
    seed(cluster.settings(api_url=api.url, artifacts_hold_timeout=60), name=block)
    script = ("mkdir -p $KERUTA_ARTIFACTS_DIR/out\necho report > $KERUTA_ARTIFACTS_DIR/out/report.txt\n"
              ": > $KERUTA_ARTIFACTS_DIR/empty\necho done")
    result = result_of(run(block, {"id": "k-files", "script": script}))
    assert result.status == "COMPLETED" and result.artifacts_note is None
    assert sorted(a.path for a in result.artifacts) == ["empty", "out/report.txt"]
    assert Path(next(a.location for a in result.artifacts if a.path == "out/report.txt")).read_text() == "report\n"
    assert sorted(a.path for a in store.artifacts("k-files")) == ["empty", "out/report.txt"]
    name = job_name("k-files", 1)
    cluster.wait_for(lambda: job_complete(cluster.job(name)), timeout=20,
                     what="the Job to complete once the agent is released")
    if harness := harness_of(cluster):
        assert harness.exec_commands[0][:2] == ["tar", "cf"] and harness.exec_commands[1][0] == "touch"


def test_a_vanished_flow_never_leaves_a_zombie_pod_and_late_collection_says_why(
        cluster: Target, api: Api, store: Store) -> None:
    from keruta_prefect.backends.base import RunContext
    from keruta_prefect.backends.kubernetes import KubernetesBackend
    from keruta_prefect.models import Task

    cluster.create_secret("keruta-api-token", {"token": api.token})
    settings = cluster.settings(api_url=api.url, artifacts_hold_timeout=1)
    backend = KubernetesBackend(settings, store)
    task = store.create_task(Task.model_validate({"id": "k-hold", "script": "echo x > $KERUTA_ARTIFACTS_DIR/f"}))
    handle = backend.launch(task, RunContext(attempt=1))
    assert backend.wait(handle).status == "COMPLETED"  # the agent now holds… and nobody collects
    cluster.wait_for(lambda: job_complete(cluster.job(handle.name)), timeout=20, what="the agent to give up holding")
    late = backend.collect(handle, cluster.root / "late")
    assert late.files == [] and late.lost is not None and late.lost.startswith("artifacts lost: the agent's Pod")


def test_upload_mode_sends_files_through_the_api_and_reports_what_was_refused(
        cluster: Target, store: Store, keruta_home: Path) -> None:
    small_api = Api(store, keruta_home / "uploads", max_file_size=1000, **cluster.api_binding()).start()  # 1000 B cap
    try:
        cluster.create_secret("keruta-api-token", {"token": small_api.token})
        block = f"k8s-{uuid.uuid4().hex[:8]}"
        seed(cluster.settings(api_url=small_api.url, artifacts_mode="upload"), name=block)
        script = ("mkdir -p $KERUTA_ARTIFACTS_DIR/out\necho report > $KERUTA_ARTIFACTS_DIR/out/report.txt\n"
                  "head -c 2000 /dev/zero > $KERUTA_ARTIFACTS_DIR/big.bin")
        result = result_of(run(block, {"id": "k-upload", "script": script}))
    finally:
        small_api.stop()
    assert result.status == "COMPLETED"
    assert [a.path for a in result.artifacts] == ["out/report.txt"]
    [row] = store.artifacts("k-upload")
    assert row.run_id == store.runs("k-upload")[0].id  # claimed by the run
    assert any("artifact big.bin not kept" in r.message and "1000-byte file cap" in r.message
               for r in store.logs("k-upload"))
    if harness := harness_of(cluster):
        assert harness.exec_commands == []  # no exec needed in upload mode


@pytest.mark.harness_only("the RBAC denial of pods/exec is injected (a real cluster would need a second user)")
def test_exec_forbidden_loses_the_artifacts_with_the_reason_and_keeps_the_status(
        cluster: Cluster, api: Api, store: Store) -> None:
    cluster.create_secret("keruta-api-token", {"token": api.token})
    cluster.deny("pods", "create", "exec")
    block = f"k8s-{uuid.uuid4().hex[:8]}"
    seed(cluster.settings(api_url=api.url, artifacts_hold_timeout=20), name=block)
    result = result_of(run(block, {"id": "k-noexec", "script": "echo x > $KERUTA_ARTIFACTS_DIR/f"}))
    assert result.status == "COMPLETED" and result.artifacts == []
    assert "artifacts lost: exec into Pod" in result.artifacts_note and "`pods/exec`" in result.artifacts_note
    assert store.runs("k-noexec")[0].artifacts_note == result.artifacts_note
