"""Real kubectl processes exec into a harness Pod and copy files out of it and into it, over each transport
kubectl speaks: 1.27 SPDY/3.1, 1.33 (and the default kubectl) a WebSocket with v5.channel.k8s.io, and 1.33
forced back to SPDY (KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false), as it falls back when the upgrade fails.
kubectl is an independent witness: it checks what the harness' exec serves, not our own client."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from keruta_harness.cluster import PODS, Cluster


@dataclass(frozen=True)
class Kubectl:
    version: str  # "" for the kubectl on PATH
    env: tuple[tuple[str, str], ...]
    transport: str  # what the harness saw: "<transport>/<protocol>"

    @property
    def binary(self) -> str:
        found = shutil.which("kubectl")
        if found is None:
            pytest.fail("kubectl is not on PATH: it is installed on every machine of this project's kind "
                        "(with kubectl.1.27 … kubectl.1.33 beside it)")
        binary = Path(found).resolve().parent / f"kubectl.{self.version}" if self.version else Path(found)
        if not binary.is_file():
            pytest.fail(f"{binary} is missing: kubectl 1.27 … 1.33 are installed beside the kubectl on PATH")
        return str(binary)


CLIENTS = [
    pytest.param(Kubectl("1.27", (), "spdy/v4.channel.k8s.io"), id="1.27-spdy"),
    pytest.param(Kubectl("1.33", (), "websocket/v5.channel.k8s.io"), id="1.33-websocket"),
    pytest.param(Kubectl("1.33", (("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false"),), "spdy/v5.channel.k8s.io"),
                 id="1.33-spdy"),
    pytest.param(Kubectl("", (), "websocket/v5.channel.k8s.io"), id="default-websocket"),
]
POD = "worker"


@pytest.fixture
def pod(manual_cluster: Cluster) -> Path:
    """A running Pod whose main container mounts an emptyDir at /data; returns the volume's directory."""
    manual_cluster.call(manual_cluster.put(PODS, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD, "namespace": "default"},
        "spec": {"containers": [{"name": "main", "image": "busybox",
                                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                 "volumes": [{"name": "data", "emptyDir": {}}]}}))
    manual_cluster.run_pod(POD)
    volume = manual_cluster.root / "pods" / "default" / POD / "data"
    volume.mkdir(parents=True, exist_ok=True)
    return volume


def kubectl(cluster: Cluster, client: Kubectl, *args: str, cwd: Path | None = None,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, **dict(client.env)}
    command = [client.binary, "--kubeconfig", str(cluster.kubeconfig()), "--cache-dir",
               str(cluster.root / "kubectl-cache"), *args]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=60, env=env, cwd=cwd,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` by its relative path, with its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def some_files(root: Path) -> dict[str, str]:
    """A binary file of several frames, a dotfile, an empty file and a nested one under ``root``."""
    files = {"blob.bin": os.urandom(3 * 2**20 + 17), ".hidden": b"dot\n", "empty": b"",
             "nested/deeper/note.txt": "ünïcode\n".encode()}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return tree(root)


@pytest.mark.parametrize("client", CLIENTS)
def test_exec_prints_the_commands_stdout(manual_cluster: Cluster, pod: Path, client: Kubectl) -> None:
    done = kubectl(manual_cluster, client, "exec", POD, "--", "echo", "hi")
    assert (done.returncode, done.stdout) == (0, b"hi\n"), done.stderr.decode()
    assert manual_cluster.exec_commands == [["echo", "hi"]]
    assert manual_cluster.exec.transports == [client.transport]


@pytest.mark.parametrize("client", CLIENTS)
def test_exec_passes_on_stderr_and_the_exit_code(manual_cluster: Cluster, pod: Path, client: Kubectl) -> None:
    done = kubectl(manual_cluster, client, "exec", POD, "--", "sh", "-c", "echo out; echo oops >&2; exit 3")
    assert done.returncode == 3, done.stderr.decode()
    assert done.stdout == b"out\n"
    assert done.stderr.decode().splitlines() == ["oops", "command terminated with exit code 3"]


@pytest.mark.parametrize("client", CLIENTS)
def test_exec_with_stdin_gets_it_whole_and_ends_it(manual_cluster: Cluster, pod: Path, client: Kubectl) -> None:
    data = os.urandom(2 * 2**20 + 5)  # many frames, more than the server holds at once
    done = kubectl(manual_cluster, client, "exec", "-i", POD, "--", "cat", stdin=data)
    assert done.returncode == 0, done.stderr.decode()
    assert hashlib.sha256(done.stdout).hexdigest() == hashlib.sha256(data).hexdigest()  # cat ended: stdin did


@pytest.mark.parametrize("client", CLIENTS)
def test_cp_out_of_the_pod_brings_every_file_byte_identical(manual_cluster: Cluster, pod: Path, client: Kubectl,
                                                            tmp_path: Path) -> None:
    expected = some_files(pod / "out")
    done = kubectl(manual_cluster, client, "cp", f"{POD}:/data/out", "local", cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert tree(tmp_path / "local") == expected
    assert manual_cluster.exec_commands == [["tar", "cf", "-", "/data/out"]]
    # the volume's mount point itself, as a user copies an agent's whole artifacts directory
    done = kubectl(manual_cluster, client, "cp", f"{POD}:/data", "whole", cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert tree(tmp_path / "whole") == {f"out/{name}": digest for name, digest in expected.items()}


@pytest.mark.parametrize("client", CLIENTS)
def test_cp_into_the_pod_sends_every_file_over_stdin(manual_cluster: Cluster, pod: Path, client: Kubectl,
                                                     tmp_path: Path) -> None:
    expected = some_files(tmp_path / "local")
    (pod / "in").mkdir()
    done = kubectl(manual_cluster, client, "cp", "local", f"{POD}:/data/in", cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert tree(pod / "in" / "local") == expected
    assert manual_cluster.exec_commands == [["test", "-d", "/data/in"], ["tar", "-xmf", "-", "-C", "/data/in"]]
