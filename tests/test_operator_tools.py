"""render, doctor and deployments/: what an operator uses, against the harness cluster or a real one
(tests/targets.py)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import javaproperties
import pytest
import yaml
from keruta_harness.cluster import Cluster
from keruta_harness.validate import validate_all

from keruta_prefect.backends.kubernetes.doctor import PERMISSIONS, SECRET_PERMISSION
from keruta_prefect.cli import main
from tests.conftest import Api
from tests.targets import Target, harness_of

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = ROOT / "deployments"


def properties_for(tmp_path: Path, cluster: Target, **extra: str) -> Path:
    """The cluster's properties (its kubeconfig; on a real cluster, its namespace, image…) and ``extra``."""
    path = tmp_path / "application.properties"
    path.write_text(javaproperties.dumps(cluster.properties(**extra), timestamp=False))
    return path


def task_file(tmp_path: Path, spec: dict[str, object]) -> Path:
    path = tmp_path / "task.json"
    path.write_text(json.dumps(spec))
    return path


def test_render_prints_valid_yaml_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = task_file(tmp_path, {"id": "render-me", "repositoryUrl": "https://git.example.com/a.git", "script": "ls"})
    assert main(["render", "--task-file", str(path)]) == 0
    pvc, job = yaml.safe_load_all(capsys.readouterr().out)
    assert (pvc["kind"], job["kind"]) == ("PersistentVolumeClaim", "Job")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KERUTA_API_URL"]["value"] == "http://keruta-api:8080"  # the seed's default
    validate_all(job)
    validate_all(pvc)


def test_render_rejects_a_bad_task_file_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = task_file(tmp_path, {"id": "x", "namespace": "Not_A_Namespace"})
    assert main(["render", "--task-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "namespace='Not_A_Namespace': must be a DNS-1123 label" in err


def test_render_server_dry_run_asks_the_cluster_and_creates_nothing(
        tmp_path: Path, cluster: Target, capsys: pytest.CaptureFixture[str]) -> None:
    path = task_file(tmp_path, {"id": "dry", "script": "ls"})
    props = properties_for(tmp_path, cluster)
    assert main(["render", "--task-file", str(path), "--properties", str(props), "--server-dry-run"]) == 0
    assert f"✓ the cluster accepts Job {cluster.namespace}/" in capsys.readouterr().err
    assert cluster.jobs() == []
    if harness := harness_of(cluster):
        [create] = harness.calls_of("create", "jobs")
        assert create.name.startswith("keruta-dry-")


def test_doctor_passes_on_a_prepared_cluster(tmp_path: Path, cluster: Target,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cluster.create_secret("keruta-api-token", {"token": "t"})
    props = properties_for(tmp_path, cluster, **{"keruta.kubernetes.default-image": "keruta-agent:0.1.0"})
    assert main(["doctor", "--properties", str(props)]) == 0
    out = capsys.readouterr().out
    namespace = cluster.namespace
    assert f"✓ cluster reachable at {cluster.url} " in out
    assert f"✓ namespace {namespace} exists and accepts agent Jobs" in out
    assert f"✓ may watch pods in {namespace}" in out and f"✓ may get pods/log in {namespace}" in out
    assert "✓ Secret keruta-api-token has the key token" in out
    assert "✓ default image keruta-agent:0.1.0 looks valid" in out
    assert out.rstrip().endswith(f"{len(PERMISSIONS) + 5} passed, 0 failed")
    assert cluster.jobs() == []  # the namespace check was a dry run


@pytest.mark.harness_only("the RBAC denials are injected (a real cluster would need a second user)")
def test_doctor_names_each_problem_and_its_fix(tmp_path: Path, manual_cluster: Cluster,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    manual_cluster.deny("pods", "watch")
    manual_cluster.deny("pods", "get", "log")
    props = properties_for(tmp_path, manual_cluster)
    assert main(["doctor", "--properties", str(props)]) == 1
    out = capsys.readouterr().out
    assert ("✗ may watch pods in default\n"
            "    fix: grant `watch` on `pods`: kubectl apply -f deployments/rbac.yaml") in out
    assert "✗ may get pods/log in default" in out
    assert "✗ Secret keruta-api-token not found in namespace default\n    fix: kubectl -n default create secret " \
           "generic keruta-api-token --from-literal=token=<token>" in out
    assert "(not pinned to a version" in out
    assert out.rstrip().endswith("3 failed")


def test_doctor_on_a_missing_namespace_and_an_unreachable_cluster(
        tmp_path: Path, cluster: Target, capsys: pytest.CaptureFixture[str]) -> None:
    props = properties_for(tmp_path, cluster)
    assert main(["doctor", "--properties", str(props), "--namespace", "nowhere"]) == 1
    assert "✗ namespace nowhere does not exist" in capsys.readouterr().out
    kubeconfig = tmp_path / "dead.json"
    kubeconfig.write_text(cluster.kubeconfig().read_text().replace(cluster.url, "http://127.0.0.1:9"))
    dead = tmp_path / "dead.properties"
    dead.write_text(f"keruta.kubernetes.config-path={kubeconfig}\n")
    assert main(["doctor", "--properties", str(dead)]) == 1
    assert "✗ cannot reach the cluster at http://127.0.0.1:9" in capsys.readouterr().out


def test_every_deployment_manifest_is_valid_for_every_supported_version() -> None:
    documents = [doc for path in sorted(DEPLOYMENTS.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    assert {d["kind"] for d in documents} >= {"ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "Deployment",
                                              "Service", "Secret"}
    for document in documents:
        validate_all(document)


def role_permissions() -> set[tuple[str, str, str | None, str]]:
    [role] = [d for d in yaml.safe_load_all((DEPLOYMENTS / "rbac.yaml").read_text()) if d["kind"] == "Role"]
    granted = set()
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                name, _, sub = resource.partition("/")
                for verb in rule["verbs"]:
                    granted.add((group, name, sub or None, verb))
    return granted


def test_the_role_grants_exactly_the_backends_permissions() -> None:
    assert role_permissions() == {*PERMISSIONS, SECRET_PERMISSION}


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.harness_only("compares the Role with every request the API server recorded")
def test_the_role_matches_the_calls_the_backend_really_makes(tmp_path: Path, cluster: Cluster, api: Api,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Run what the backend does (a repository task with a volume, a reattach, a cancel, doctor) and
    compare every API call the cluster saw with the Role: nothing more is needed, nothing granted is unused."""
    from keruta_prefect.backends.base import RunContext
    from keruta_prefect.backends.kubernetes import KubernetesBackend
    from keruta_prefect.blocks import seed
    from keruta_prefect.flows import keruta_task, stop_flow_run_agents
    from keruta_prefect.models import Task
    from keruta_prefect.settings import KerutaSettings
    from keruta_prefect.store import get_store

    cluster.create_secret("keruta-api-token", {"token": api.token})
    cluster.add_git_remote("https://git.example.com/r.git", {"f": "x"})
    settings = KerutaSettings(config_path=str(cluster.kubeconfig()), api_url=api.url, artifacts_hold_timeout=30)
    block = f"rbac-{uuid.uuid4().hex[:8]}"
    seed(settings, name=block)
    store = get_store()
    assert keruta_task(task_spec={"id": "r1", "repositoryUrl": "https://git.example.com/r.git",
                                  "script": "ls > $KERUTA_ARTIFACTS_DIR/listing.txt"},
                       backend="kubernetes", settings_block=block).artifacts[0].path == "listing.txt"
    backend = KubernetesBackend(settings, store)
    long_task = store.create_task(Task.model_validate({"id": "r2", "script": "sleep 60"}))
    backend.launch(long_task, RunContext(flow_run_id="rbac-run", attempt=1))
    backend.launch(long_task, RunContext(flow_run_id="rbac-run", attempt=1))  # 409: reattach reads the Job
    assert stop_flow_run_agents("rbac-run", block, backend="kubernetes") == ["r2"]
    # The reconciler: an orphan Pod (its Job deleted with Orphan propagation) and the finished Job of r1.
    import kubernetes.client

    from keruta_prefect.reconcile import reconcile

    handle = backend.launch(store.create_task(Task.model_validate({"id": "r3", "script": "sleep 60"})),
                            RunContext(flow_run_id="rbac-gone", attempt=1))
    cluster.wait_for_pod(handle.name)
    kubernetes.client.BatchV1Api(backend.api).delete_namespaced_job(handle.name, cluster.namespace,
                                                                    propagation_policy="Orphan")
    cluster.wait_for(lambda: cluster.job(handle.name) is None, what="r3's Job to go, its Pod left")
    later = datetime.now(UTC) + timedelta(seconds=settings.reconcile_grace_seconds + 1)
    assert {a.kind for a in reconcile(settings, store, now=later).actions} >= {"delete-job", "delete-pod"}
    assert main(["doctor", "--settings-block", block]) == 0
    capsys.readouterr()

    used = {(c.group, c.resource, c.subresource, c.verb) for c in cluster.calls
            if c.resource not in ("selfsubjectaccessreviews", "")}
    assert used == role_permissions()
