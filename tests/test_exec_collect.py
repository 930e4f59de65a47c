"""Collecting an agent container's files with tar over the exec WebSocket (the harness serves the
Kubernetes channel protocol on a real WebSocket). Harness only: a manual kubelet holds the Pod, and the test
puts the container's files in place on this machine."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from keruta_harness.cluster import Cluster

from keruta_prefect.artifacts import ArchiveRejected
from keruta_prefect.backends.base import RunContext
from keruta_prefect.backends.kubernetes import KubernetesBackend
from keruta_prefect.backends.kubernetes.exec import ArtifactsLost, collect_directory
from keruta_prefect.models import Task
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store


def running_pod(cluster: Cluster, store: Store) -> tuple[KubernetesBackend, str, Path]:
    backend = KubernetesBackend(KerutaSettings(config_path=str(cluster.kubeconfig()), artifacts_mode="off"), store)
    handle = backend.launch(store.create_task(Task(id=f"x-{len(cluster.jobs())}")), RunContext(attempt=1))
    pod = cluster.wait_for_pod(handle.name)["metadata"]["name"]
    cluster.run_pod(pod)
    files = cluster.root / "pods" / "default" / pod / "artifacts"  # the Pod's /.keruta/doc
    files.mkdir(parents=True, exist_ok=True)
    return backend, pod, files


def collect(backend: KubernetesBackend, pod: str, dest: Path) -> object:
    return collect_directory(backend.api, "default", pod, "/.keruta/doc", dest, max_file_size=64 * 2**20,
                             max_total_size=256 * 2**20)


@pytest.mark.harness_only("a manual kubelet holds the Pod, its files put there from this machine; execs are counted")
def test_files_come_over_the_websocket_whole_and_checksummed(manual_cluster: Cluster, store: Store,
                                                             tmp_path: Path) -> None:
    backend, pod, files = running_pod(manual_cluster, store)
    expected = {f"logs/part-{i}.txt": f"part {i}\n".encode() * 50 for i in range(200)}
    expected["empty"] = b""
    expected["blob.bin"] = os.urandom(5 * 2**20)  # many WebSocket frames
    for name, data in expected.items():
        (files / name).parent.mkdir(parents=True, exist_ok=True)
        (files / name).write_bytes(data)
    result = collect(backend, pod, tmp_path / "out")
    assert {f.path: f.sha256 for f in result.files} == {n: hashlib.sha256(d).hexdigest() for n, d in expected.items()}
    assert manual_cluster.exec_commands == [["tar", "cf", "-", "-C", "/.keruta/doc", "."]]


@pytest.mark.harness_only("the RBAC denial of pods/exec is injected (a real cluster would need a second user)")
def test_exec_forbidden_names_the_missing_permission(manual_cluster: Cluster, store: Store, tmp_path: Path) -> None:
    backend, pod, _files = running_pod(manual_cluster, store)
    manual_cluster.deny("pods", "create", "exec")
    with pytest.raises(ArtifactsLost, match=r"forbidden: grant `create` on `pods/exec`"):
        collect(backend, pod, tmp_path / "out")


@pytest.mark.harness_only("a manual kubelet ends the Pod while it is followed")
def test_a_pod_that_is_gone_or_has_stopped(manual_cluster: Cluster, store: Store, tmp_path: Path) -> None:
    backend, pod, _files = running_pod(manual_cluster, store)
    manual_cluster.finish_pod(pod, 0)
    with pytest.raises(ArtifactsLost, match="not running any more"):
        collect(backend, pod, tmp_path / "out")
    manual_cluster.call(manual_cluster.delete_pod("default", pod))
    with pytest.raises(ArtifactsLost, match="is gone"):
        collect(backend, pod, tmp_path / "out")


@pytest.mark.harness_only("a manual kubelet holds the Pod, its files put there from this machine")
def test_a_link_out_of_the_container_rejects_the_collection(manual_cluster: Cluster, store: Store,
                                                            tmp_path: Path) -> None:
    backend, pod, files = running_pod(manual_cluster, store)
    (files / "report.txt").write_text("ok")
    (files / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(ArchiveRejected, match=r"unsafe entry '\./passwd'"):
        collect(backend, pod, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.harness_only("a manual kubelet holds the Pod")
def test_tar_failing_in_the_container_says_why(manual_cluster: Cluster, store: Store, tmp_path: Path) -> None:
    backend, pod, _files = running_pod(manual_cluster, store)
    with pytest.raises(ArtifactsLost, match=r"tar in Pod \S+ failed: command terminated with non-zero exit code"):
        collect_directory(backend.api, "default", pod, "/no/such/directory", tmp_path / "out",
                          max_file_size=2**20, max_total_size=2**20)


def test_a_200_mb_artifact_over_the_websocket_keeps_memory_flat() -> None:
    """The benchmark in its own process: 200 MiB over exec, peak RSS growth measured (no timing asserted)."""
    import re
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "benchmarks.artifacts", "200", "50"], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| one file of 200 MiB"))
    growth = float(re.findall(r"([0-9.]+) MiB \|$", row)[0])
    assert growth < 100, row
