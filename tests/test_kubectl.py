"""kubectl, the client every operator uses, as an independent witness of the harness cluster: real kubectl
processes (the oldest and newest of this machine's versions, and the default one) against a harness cluster,
doing what a person does with a Job that `keruta-prefect render` built.

kubectl is installed on every machine of this project's kind (`kubectl` on PATH, `kubectl.1.NN` beside it):
a missing binary is a failure here, not a skip.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from keruta_harness.cluster import Cluster

from keruta_prefect.cli import main
from keruta_prefect.contract import COLLECTED_MARKER, DEFAULT_ARTIFACTS_DIR
from keruta_prefect.models import Task
from keruta_prefect.store import Store
from tests.conftest import Api
from tests.waiting import eventually

pytestmark = pytest.mark.harness_only("kubectl witnesses the harness here; a real cluster needs no witness")

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("1.27", "1.33", "default")
TIMEOUT = 60
EVERY_KUBECTL = pytest.mark.parametrize("kubectl", VERSIONS, indirect=True, ids=[f"kubectl-{v}" for v in VERSIONS])


def kubectl_binary(version: str) -> str:
    default = shutil.which("kubectl")
    assert default is not None, "kubectl is not on PATH: every machine of this kind has it (1.27 to 1.33)"
    if version == "default":
        return default
    path = Path(os.path.realpath(default)).parent / f"kubectl.{version}"
    assert path.is_file(), f"{path} is missing: every machine of this kind has kubectl 1.27 to 1.33 beside kubectl"
    return str(path)


@dataclass
class Kubectl:
    binary: str
    kubeconfig: Path
    cwd: Path

    def env(self) -> dict[str, str]:
        return {**{k: v for k, v in os.environ.items() if not k.startswith("KUBECTL_")},
                "KUBECONFIG": str(self.kubeconfig), "HOME": str(self.cwd)}  # a fresh discovery cache each test

    def __call__(self, *args: str, check: bool = True, stdin: bytes | None = None,
                 timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([self.binary, *args], input=stdin.decode() if stdin is not None else None,
                              capture_output=True, text=True, env=self.env(), cwd=self.cwd, timeout=timeout)
        if check:
            assert done.returncode == 0, f"kubectl {' '.join(args)} → {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self, *args: str) -> subprocess.Popen[str]:
        """A kubectl that runs on (follow, watch, wait) while the test goes on; ended with the test."""
        proc = subprocess.Popen([self.binary, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env(), cwd=self.cwd)
        self.started.append(proc)
        return proc


@pytest.fixture(params=VERSIONS[:2], ids=[f"kubectl-{v}" for v in VERSIONS[:2]])
def kubectl(request: pytest.FixtureRequest, cluster: Cluster, tmp_path: Path) -> Iterator[Kubectl]:
    """kubectl 1.27 and 1.33; the tests parametrized with EVERY_KUBECTL also run the default `kubectl`
    (gcloud's dispatcher, which runs 1.33 against the harness's v1.33: discovery and the whole rendered-Job
    story prove it; the other tests would only repeat 1.33)."""
    home = tmp_path / "home"
    home.mkdir()
    client = Kubectl(kubectl_binary(request.param), cluster.kubeconfig(), home)
    yield client
    for proc in client.started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finish(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"kubectl did not end in {timeout}s:\n{out}\n{err}") from None
    return proc.returncode, out, err


# --- discovery -------------------------------------------------------------------------------------------
@EVERY_KUBECTL
def test_version_and_discovery(kubectl: Kubectl) -> None:
    version = json.loads(kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.33")
    resources = kubectl("api-resources").stdout
    lines = {line.split()[0]: line.split() for line in resources.splitlines()[1:]}
    assert {"pods", "jobs", "namespaces", "secrets", "persistentvolumeclaims", "roles",
            "selfsubjectaccessreviews"} <= set(lines)
    assert lines["pods"][1:] == ["po", "v1", "true", "Pod"]
    assert lines["jobs"][1:] == ["batch/v1", "true", "Job"]
    assert lines["namespaces"][1:] == ["ns", "v1", "false", "Namespace"]
    versions = kubectl("api-versions").stdout.split()
    assert {"v1", "batch/v1", "rbac.authorization.k8s.io/v1", "authorization.k8s.io/v1"} <= set(versions)
    assert "error" not in kubectl("get", "po,jobs", "-A").stderr.lower()


# --- apply, create, delete -------------------------------------------------------------------------------
def test_the_deployment_files_apply_and_reapply(kubectl: Kubectl) -> None:
    assert kubectl("create", "namespace", "keruta").stdout.strip() == "namespace/keruta created"
    token = kubectl("-n", "keruta", "create", "secret", "generic", "keruta-api-token", "--from-literal=token=s3cret")
    assert token.stdout.strip() == "secret/keruta-api-token created"
    stored = json.loads(kubectl("-n", "keruta", "get", "secret", "keruta-api-token", "-o", "json").stdout)
    assert stored["data"] == {"token": "czNjcmV0"} and stored["type"] == "Opaque"
    files = [f"-f={ROOT / 'deployments' / name}" for name in ("rbac.yaml", "networkpolicy.yaml", "keruta-api.yaml")]
    applied = kubectl("apply", *files).stdout.splitlines()
    assert applied == ["serviceaccount/keruta created", "role.rbac.authorization.k8s.io/keruta-runner created",
                       "rolebinding.rbac.authorization.k8s.io/keruta-runner created",
                       "networkpolicy.networking.k8s.io/keruta-agent-egress created",
                       "networkpolicy.networking.k8s.io/keruta-agent-git created",
                       "deployment.apps/keruta-api created", "service/keruta-api created"]
    assert all(line.endswith(" unchanged") for line in kubectl("apply", *files).stdout.splitlines())
    role = json.loads(kubectl("-n", "keruta", "get", "role", "keruta-runner", "-o", "json").stdout)
    jobs_rule = {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "delete"]}
    assert jobs_rule in role["rules"]
    # A change applies as a (strategic merge) patch, and the server keeps what apply recorded.
    changed = kubectl.cwd / "rbac.yaml"
    changed.write_text((ROOT / "deployments" / "rbac.yaml").read_text().replace(
        "  name: keruta\n  namespace: keruta\n", "  name: keruta\n  namespace: keruta\n  labels: {team: a}\n", 1))
    assert "serviceaccount/keruta configured" in kubectl("apply", "-f", str(changed)).stdout
    account = json.loads(kubectl("-n", "keruta", "get", "sa", "keruta", "-o", "json").stdout)
    assert account["metadata"]["labels"] == {"team": "a"}
    assert "team" in account["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
    assert "keruta-runner" in kubectl("-n", "keruta", "get", "roles").stdout


DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata: {name: two, namespace: default}
spec:
  selector: {matchLabels: {app: two}}
  template:
    metadata: {labels: {app: two}}
    spec:
      containers:
      - {name: a, image: "busybox:1.36", ports: [{containerPort: 80}], env: [{name: X, value: "1"}]}
      - {name: b, image: "busybox:1.36", ports: [{containerPort: 81}]}
"""


def test_writes_are_what_an_api_server_makes_of_them(kubectl: Kubectl, tmp_path: Path) -> None:
    """Patches merge lists by their keys, dry runs store nothing whatever the verb, binary protobuf bodies
    arrive whole, and every kind is validated."""
    (tmp_path / "d.yaml").write_text(DEPLOYMENT)
    kubectl("apply", "-f", str(tmp_path / "d.yaml"))
    (tmp_path / "d.yaml").write_text(DEPLOYMENT.replace('b, image: "busybox:1.36"', 'b, image: "busybox:1.37"'))
    assert kubectl("apply", "-f", str(tmp_path / "d.yaml")).stdout.strip() == "deployment.apps/two configured"
    stored = json.loads(kubectl("get", "deploy", "two", "-o", "json").stdout)
    assert stored["spec"]["template"]["spec"]["containers"] == [
        {"name": "a", "image": "busybox:1.36", "ports": [{"containerPort": 80}], "env": [{"name": "X", "value": "1"}]},
        {"name": "b", "image": "busybox:1.37", "ports": [{"containerPort": 81}]}]
    assert "$setElementOrder" not in json.dumps(stored)

    blob = os.urandom(4096)
    (tmp_path / "blob").write_bytes(blob)
    kubectl("create", "secret", "generic", "bin", "--from-file=b=" + str(tmp_path / "blob"), "--type=x/y")
    secret = json.loads(kubectl("get", "secret", "bin", "-o", "json").stdout)
    assert (base64.b64decode(secret["data"]["b"]), secret["type"]) == (blob, "x/y")

    assert "(server dry run)" in kubectl("create", "namespace", "dry", "--dry-run=server").stdout
    assert "(server dry run)" in kubectl("label", "secret", "bin", "a=b", "--dry-run=server").stdout
    assert "(server dry run)" in kubectl("delete", "secret", "bin", "--dry-run=server").stdout
    assert "dry" not in kubectl("get", "namespaces", "-o", "name").stdout
    assert json.loads(kubectl("get", "secret", "bin", "-o", "json").stdout)["metadata"].get("labels") is None
    kubectl("label", "namespace", "default", "team=a")
    assert kubectl("get", "namespaces", "-l", "team=a", "-o", "name").stdout.split() == ["namespace/default"]

    (tmp_path / "role.yaml").write_text("apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: r}\n"
                                        "rules: [{apiGroups: [''], resourcez: [pods], verbs: [get]}]\n")
    refused = kubectl("apply", "-f", str(tmp_path / "role.yaml"), check=False)
    assert refused.returncode == 1 and "resourcez" in refused.stderr
    assert "restartPolicy" in kubectl("explain", "pod.spec.restartPolicy").stdout


def test_server_dry_run_and_strict_validation(kubectl: Kubectl, tmp_path: Path, keruta_home: Path,
                                              cluster: Cluster) -> None:
    job = render(tmp_path, {"id": "dry", "script": "true"}, "http://127.0.0.1:9")
    name = yaml.safe_load(job.read_text())["metadata"]["name"]
    assert kubectl("create", "-f", str(job), "--dry-run=server").stdout.strip() == \
        f"job.batch/{name} created (server dry run)"
    assert cluster.jobs() == []
    bad = yaml.safe_load(job.read_text())
    bad["spec"]["template"]["spec"]["containers"][0]["resources"] = {"limits": {"memory": "1 Gi"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    refused = kubectl("create", "-f", str(tmp_path / "bad.yaml"), "--dry-run=server", check=False)
    assert refused.returncode == 1 and "quantities must match the regular expression" in refused.stderr
    bad = yaml.safe_load(job.read_text())
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    refused = kubectl("apply", "-f", str(tmp_path / "bad.yaml"), check=False)
    assert refused.returncode == 1 and "imagePullPolice" in refused.stderr
    assert cluster.jobs() == []


def test_the_setup_in_deployments_readme_works_as_typed(kubectl: Kubectl) -> None:
    """The first commands of deployments/README.md, typed into a shell whose `kubectl` is this version, make
    a cluster on which `keruta-prefect doctor` passes."""
    readme = (ROOT / "deployments" / "README.md").read_text()
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.startswith("kubectl ")]
    assert len(commands) >= 3, block
    bin_dir = kubectl.cwd / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").symlink_to(kubectl.binary)
    env = {**kubectl.env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    doctor = next(line for line in block.splitlines() if line.startswith("keruta-prefect doctor"))
    done = subprocess.run([sys.executable, "-m", "keruta_prefect.cli", *doctor.split()[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0 and done.stdout.rstrip().endswith(" passed, 0 failed"), done.stdout + done.stderr


def test_auth_can_i_answers_from_the_policy(kubectl: Kubectl, cluster: Cluster) -> None:
    cluster.deny("pods", "create", "exec")
    cluster.deny("jobs", "delete", namespace="keruta")
    assert kubectl("auth", "can-i", "create", "jobs").stdout.strip() == "yes"
    refused = kubectl("auth", "can-i", "create", "pods", "--subresource=exec", check=False)  # 1.27 reads pods/exec
    # as the Pod named "exec"
    assert (refused.returncode, refused.stdout.strip()) == (1, "no")
    assert kubectl("auth", "can-i", "get", "pods", "--subresource=log").stdout.strip() == "yes"
    assert kubectl("auth", "can-i", "delete", "jobs").stdout.strip() == "yes"
    refused = kubectl("-n", "keruta", "auth", "can-i", "delete", "jobs", check=False)
    assert (refused.returncode, refused.stdout.strip()) == (1, "no")


# --- a rendered Job, driven with kubectl alone -----------------------------------------------------------
def render(tmp_path: Path, spec: dict[str, object], api_url: str) -> Path:
    (tmp_path / "task.json").write_text(json.dumps(spec))
    (tmp_path / "keruta.properties").write_text(
        f"keruta.kubernetes.api-url={api_url}\nkeruta.kubernetes.default-image=keruta-agent:test\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["render", "--task-file", str(tmp_path / "task.json"), "--properties",
                     str(tmp_path / "keruta.properties")]) == 0
    (tmp_path / "job.yaml").write_text(out.getvalue())
    return tmp_path / "job.yaml"


@pytest.fixture
def holding_job(kubectl: Kubectl, api: Api, store: Store, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A rendered Job applied with kubectl whose agent ran its script and holds its files for collection:
    (job name, pod name)."""
    script = ("echo first line; echo second line >&2; mkdir -p $KERUTA_ARTIFACTS_DIR/sub; "
              "printf 'report' > $KERUTA_ARTIFACTS_DIR/report.md; printf 'dot' > $KERUTA_ARTIFACTS_DIR/.hidden; "
              "head -c 300000 /dev/urandom > $KERUTA_ARTIFACTS_DIR/sub/blob.bin")
    store.create_task(Task(id="kubectl-1", title="by hand", script=script))
    kubectl("create", "secret", "generic", "keruta-api-token", f"--from-literal=token={api.token}")
    job = render(tmp_path, {"id": "kubectl-1"}, api.url)
    name = yaml.safe_load(job.read_text())["metadata"]["name"]
    assert kubectl("apply", "-f", str(job)).stdout.strip() == f"job.batch/{name} created"
    pod = eventually(lambda: kubectl("get", "pods", "-l", f"job-name={name}", "-o", "name").stdout.strip(),
                     what="the Job's Pod").removeprefix("pod/")
    kubectl("wait", "--for=condition=Ready", f"pod/{pod}", f"--timeout={TIMEOUT}s")
    eventually(lambda: "artifacts ready" in kubectl("logs", pod).stdout, what="the agent to hold its files")
    yield name, pod


@EVERY_KUBECTL
def test_a_rendered_job_driven_with_kubectl(kubectl: Kubectl, holding_job: tuple[str, str], tmp_path: Path,
                                           cluster: Cluster) -> None:
    name, pod = holding_job
    # get, wide, yaml/json and describe show what a cluster shows
    table = kubectl("get", "job", name).stdout.splitlines()
    assert table[0].split() == ["NAME", "STATUS", "COMPLETIONS", "DURATION", "AGE"]
    assert table[1].split()[:3] == [name, "Running", "0/1"]
    wide = kubectl("get", "pods", "-o", "wide").stdout.splitlines()
    assert wide[0].split()[:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert wide[1].split()[:4] == [pod, "1/1", "Running", "0"]
    as_json = json.loads(kubectl("get", "pod", pod, "-o", "json").stdout)
    as_yaml = yaml.safe_load(kubectl("get", "pod", pod, "-o", "yaml").stdout)
    assert as_json == as_yaml and as_json["metadata"]["labels"]["job-name"] == name
    assert as_json["metadata"]["ownerReferences"][0]["name"] == name
    text = kubectl("describe", "job", name).stdout
    described = fields(text)
    assert described["Name"] == name and described["Pods Statuses"].startswith("1 Active")
    assert "keruta.io/task-id=kubectl-1" in text
    described = fields(kubectl("describe", "pod", pod).stdout)
    assert (described["Controlled By"], described["Status"]) == (f"Job/{name}", "Running")

    # logs: whole, stamped, since a time, and followed
    logs = kubectl("logs", pod).stdout.splitlines()
    assert "first line" in logs and "second line" in logs
    stamped = kubectl("logs", f"job/{name}", "--timestamps").stdout.splitlines()
    first = next(line for line in stamped if line.endswith(" first line"))
    stamp = first.split(" ", 1)[0]
    assert stamp.endswith("Z") and len(stamp) == len("2026-01-01T00:00:00.000000000Z")
    later = kubectl("logs", pod, "--since-time=2999-01-01T00:00:00Z").stdout
    assert later == ""
    since = kubectl("logs", pod, f"--since-time={stamp[:19]}Z").stdout.splitlines()
    assert "first line" in since
    follower = kubectl.start("logs", "-f", pod)
    watcher = kubectl.start("get", "jobs", "-w", "--output-watch-events")

    # cp and exec: the files the agent holds, byte for byte; then hand-over as the collector does it
    out = tmp_path / "copied"
    kubectl("cp", f"{pod}:{DEFAULT_ARTIFACTS_DIR}", str(out), "-c", "main")
    held = cluster.root / "pods" / "default" / pod / "artifacts"
    assert digest(out) == digest(held) and {".hidden", "report.md", "sub/blob.bin"} <= set(digest(out))
    assert kubectl("exec", pod, "--", "cat", f"{DEFAULT_ARTIFACTS_DIR}/report.md").stdout == "report"
    kubectl("exec", pod, "--", "touch", f"{DEFAULT_ARTIFACTS_DIR}/{COLLECTED_MARKER}")

    # wait: the Job completes once its files are taken; the follower ends with the container
    assert kubectl("wait", "--for=condition=complete", f"job/{name}", f"--timeout={TIMEOUT}s").stdout.strip() == \
        f"job.batch/{name} condition met"
    code, followed, _err = finish(follower)
    assert code == 0 and "first line" in followed.splitlines()
    assert kubectl("get", "job", name).stdout.splitlines()[1].split()[:3] == [name, "Complete", "1/1"]

    # delete with foreground cascading; --wait and wait --for=delete see it gone
    gone = kubectl.start("wait", "--for=delete", f"pod/{pod}", f"--timeout={TIMEOUT}s")
    deleted = kubectl("delete", "job", name, "--cascade=foreground", "--wait")
    assert deleted.stdout.strip() == f'job.batch "{name}" deleted'
    code, _out, err = finish(gone)
    assert code == 0, err
    assert "No resources found" in kubectl("get", "jobs,pods").stderr
    watcher.send_signal(signal.SIGINT)
    _code, events, _err = finish(watcher)
    kinds = [line.split()[0] for line in events.splitlines()[1:]]
    assert kinds[0] == "ADDED" and "MODIFIED" in kinds and kinds[-1] == "DELETED", events


def fields(described: str) -> dict[str, str]:
    """The top-level `Key: value` lines of `kubectl describe` (its column widths differ between versions)."""
    out = {}
    for line in described.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" ") and key not in out:
            out[key] = value.strip()
    return out


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
