"""Artifact collection over exec (tar on a real WebSocket, streamed into the safe extractor) against a
plain `tar cf - | cat` of the same files on this machine, and against `kubectl cp` of the same files from
the same holding container on the same harness (what users reach for without keruta-prefect).

    .venv/bin/python -m benchmarks.artifacts [MiB of the large file] [number of small files] [runs]

The harness cluster (its API server and the exec endpoint both copies go through) runs in a process of its
own (``--serve``), as a real API server and kubelet would: it does not share a GIL with the collector. Peak
memory is this process's high-water mark (VmHWM) growth during the large collection: the collector's alone.
Every copy is checked against the source files (paths, sizes, sha256) before its time counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

KUBECTL_TIMEOUT = 600  # seconds for one `kubectl cp`; the full run's 1 GiB takes a few


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def tar_cat(source: Path) -> float:
    start = time.perf_counter()
    subprocess.run(f"tar cf - -C {source} . | cat > /dev/null", shell=True, check=True)
    return time.perf_counter() - start


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every regular file under ``root``: its relative path → (size, sha256)."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        found[path.relative_to(root).as_posix()] = (path.stat().st_size, digest.hexdigest())
    return found


def differences(expected: dict[str, tuple[int, str]], got: dict[str, tuple[int, str]]) -> str:
    """What a copy got wrong, in one line ('' when it is identical)."""
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    changed = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    parts = [f"{what} {len(names)} ({', '.join(names[:3])})" for what, names in
             (("missing", missing), ("unexpected", extra), ("different", changed)) if names]
    return "; ".join(parts)


class KubectlCpFailed(Exception):
    """`kubectl cp` did not deliver the files: its exit status and last stderr line, or what differs."""


def kubectl_env(kubeconfig: Path) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(kubeconfig)}


def kubectl_version(kubeconfig: Path) -> str:
    """The version of the kubectl that runs against this cluster. `kubectl` on PATH may be gcloud's
    dispatcher, which runs the kubectl.1.NN beside it that matches the server's version: then both."""
    def client(env: dict[str, str]) -> str:
        try:
            done = subprocess.run(["kubectl", "version", "--client", "-o", "json"], env=env, capture_output=True,
                                  text=True, timeout=60)
            return str(json.loads(done.stdout)["clientVersion"]["gitVersion"])
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            return f"unknown ({type(exc).__name__}: {exc})"

    used = client(kubectl_env(kubeconfig))
    own = client({**os.environ, "KUBECONFIG": os.devnull})
    return used if own == used else f"{used}, run by `kubectl` {own} on PATH (gcloud's dispatcher: it runs the " \
                                    "kubectl.1.NN beside it that matches the server's version)"


def kubectl_cp(kubeconfig: Path, pod: str, container: str, source: str, dest: Path) -> float:
    """`kubectl cp POD:source dest -c container`: the seconds it took; KubectlCpFailed when it fails."""
    start = time.perf_counter()
    try:
        done = subprocess.run(["kubectl", "cp", f"{pod}:{source}", str(dest), "-c", container],
                              env=kubectl_env(kubeconfig), capture_output=True, text=True, timeout=KUBECTL_TIMEOUT)
    except FileNotFoundError as exc:
        raise KubectlCpFailed(f"kubectl is not on PATH ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise KubectlCpFailed(f"`kubectl cp` did not end in {KUBECTL_TIMEOUT} s") from exc
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise KubectlCpFailed(f"`kubectl cp` exit status {done.returncode}: {said}")
    return elapsed


class Harness:
    """The harness cluster in a child process (``python -m benchmarks.artifacts --serve ROOT``), manual
    kubelet: it prints its kubeconfig's path, then, for each Job name written to its stdin, waits for the
    Job's Pod, sets its main container running and prints the Pod's name. Closing its stdin stops it."""

    def __init__(self, root: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.artifacts", "--serve", str(root)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=Path(__file__).resolve().parent.parent)  # where `benchmarks` is
        self.kubeconfig = Path(self._answer())

    def _answer(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"the harness process ended (exit status {self.process.wait()})")
        return line

    def run_pod(self, job: str) -> str:
        """The name of ``job``'s Pod, once its main container runs."""
        assert self.process.stdin is not None
        self.process.stdin.write(job + "\n")
        self.process.stdin.flush()
        return self._answer()

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve(root: Path) -> None:
    """The child's side of Harness."""
    from keruta_harness.cluster import Cluster

    cluster = Cluster(root, kubelet="manual", validate=False).start()
    try:
        print(cluster.kubeconfig(), flush=True)
        for line in sys.stdin:
            pod = cluster.wait_for_pod(line.strip())["metadata"]["name"]
            cluster.run_pod(pod)
            print(pod, flush=True)
    finally:
        cluster.stop()


@dataclass
class Case:
    """One artifact case: ``label`` names it in results.json; times in seconds, sizes in bytes."""
    label: str
    title: str
    size: int
    keruta_s: float
    tar_s: float
    rss_growth: int
    kubectl_s: float | None = None  # None: kubectl cp failed (the reason is in Artifacts.kubectl_notes)


@dataclass
class Artifacts:
    cases: list[Case]
    kubectl_version: str
    kubectl_notes: list[str] = field(default_factory=list)  # why a case's kubectl cp failed


def size_label(mib: int) -> str:
    return f"{mib // 1024}gib" if mib % 1024 == 0 else f"{mib}mib"


def measure(big_mib: int, small_files: int, runs: int = 1) -> Artifacts:
    """Collect one file of ``big_mib`` MiB and ``small_files`` files of 1 KiB over exec; time `tar | cat`
    and `kubectl cp` of the same directories. With ``runs`` > 1, each copy of each case is timed that many
    times, taking turns, and its median counts (RSS growth: the largest)."""
    from keruta_prefect.backends.base import RunContext
    from keruta_prefect.backends.kubernetes import KubernetesBackend, watch
    from keruta_prefect.backends.kubernetes.exec import collect_directory
    from keruta_prefect.contract import DEFAULT_ARTIFACTS_DIR
    from keruta_prefect.models import Task
    from keruta_prefect.settings import KerutaSettings
    from keruta_prefect.store import Store

    root = Path(tempfile.mkdtemp(prefix="keruta-bench-artifacts-"))
    result = Artifacts([], "")
    harness = Harness(root / "cluster")
    try:
        kubeconfig = harness.kubeconfig
        store = Store(f"sqlite:///{root / 'k.db'}")
        backend = KubernetesBackend(KerutaSettings(config_path=str(kubeconfig)), store)
        handle = backend.launch(store.create_task(Task(id="bench")), RunContext(attempt=1))
        pod = harness.run_pod(handle.name)
        files = root / "cluster" / "pods" / "default" / pod / "artifacts"  # the artifacts volume, as mapped
        cases = [(size_label(big_mib), f"one file of {big_mib} MiB", _big(files / "big", big_mib), big_mib * 2**20),
                 ("small", f"{small_files} files of 1 KiB", _small(files / "small", small_files), small_files * 1024)]
        result.kubectl_version = kubectl_version(kubeconfig)
        for label, title, source, size in cases:
            expected = tree(source)
            mount = f"{DEFAULT_ARTIFACTS_DIR}/{source.name}"
            keruta_s: list[float] = []
            tar_s: list[float] = []
            kubectl_s: list[float] = []
            growth = 0
            for _ in range(runs):
                tar_s.append(tar_cat(source))
                before = vm_hwm()
                start = time.perf_counter()
                collected = collect_directory(backend.api, "default", pod, mount, root / "out" / source.name,
                                              max_file_size=2**40, max_total_size=2**40)
                keruta_s.append(time.perf_counter() - start)
                growth = max(growth, vm_hwm() - before)
                got = {f.path: (f.size, f.sha256) for f in collected.files}
                assert got == expected, f"keruta collected other files than {title}: {differences(expected, got)}"
                shutil.rmtree(root / "out" / source.name)
                if len(kubectl_s) == len(keruta_s) - 1:  # once kubectl cp has failed, it is not run again
                    try:
                        kubectl_s.append(_kubectl_cp_checked(kubeconfig, pod, mount, source, root / "kubectl",
                                                             expected))
                    except KubectlCpFailed as exc:
                        result.kubectl_notes.append(f"{title}: {exc}")
            result.cases.append(Case(label, title, size, statistics.median(keruta_s), statistics.median(tar_s), growth,
                                     statistics.median(kubectl_s) if len(kubectl_s) == runs else None))
    finally:
        watch.stop_all()
        harness.stop()
        shutil.rmtree(root, ignore_errors=True)
    return result


def _big(directory: Path, mib: int) -> Path:
    directory.mkdir(parents=True)
    with (directory / "big.bin").open("wb") as out:
        chunk = os.urandom(1 << 20)
        for _ in range(mib):
            out.write(chunk)
    return directory


def _small(directory: Path, count: int) -> Path:
    directory.mkdir(parents=True)
    for i in range(count):
        (directory / f"f{i:05d}.txt").write_bytes(os.urandom(1024))
    return directory


def _kubectl_cp_checked(kubeconfig: Path, pod: str, mount: str, source: Path, scratch: Path,
                        expected: dict[str, tuple[int, str]]) -> float:
    """`kubectl cp` of the container path ``mount``, as a user types it. The copy must be identical to
    ``expected`` (paths, sizes, sha256), or its time means nothing; a failure is said in the report (and
    fails the smoke test), never worked around."""
    dest = scratch / source.name
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    elapsed = kubectl_cp(kubeconfig, pod, "main", mount, dest)
    wrong = differences(expected, tree(dest))
    shutil.rmtree(dest)
    if wrong:
        raise KubectlCpFailed(f"`kubectl cp {pod}:{mount}` copied other bytes than the source: {wrong}")
    return elapsed


def main(big_mib: int, small_files: int, runs: int = 1) -> None:
    from benchmarks.report import artifacts_figures, artifacts_notes, render_artifacts

    measured = measure(big_mib, small_files, runs)
    print("\n".join(render_artifacts(artifacts_figures(measured), artifacts_notes(measured))), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(Path(sys.argv[2]))
        raise SystemExit(0)
    arguments = [int(a) for a in sys.argv[1:]]
    main(arguments[0] if arguments else 200, arguments[1] if len(arguments) > 1 else 10000,
         arguments[2] if len(arguments) > 2 else 1)
