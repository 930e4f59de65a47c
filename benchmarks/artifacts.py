"""Artifact collection over exec (tar on a real WebSocket, streamed into the safe extractor) against a
plain `tar cf - | cat` of the same files on this machine.

    .venv/bin/python -m benchmarks.artifacts [MiB of the large file] [number of small files]

Peak memory is the process's high-water mark (VmHWM) growth during the large collection; the process
also runs the harness API server and its WebSocket, so this over-states what the collector alone uses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def tar_cat(source: Path) -> float:
    start = time.perf_counter()
    subprocess.run(f"tar cf - -C {source} . | cat > /dev/null", shell=True, check=True)
    return time.perf_counter() - start


def measure(big_mib: int, small_files: int) -> list[dict[str, float | str]]:
    """Collect one file of ``big_mib`` MiB and ``small_files`` files of 1 KiB over exec; time `tar | cat`
    of the same directories."""
    from keruta_harness.cluster import Cluster

    from keruta_prefect.backends.base import RunContext
    from keruta_prefect.backends.kubernetes import KubernetesBackend, watch
    from keruta_prefect.backends.kubernetes.exec import collect_directory
    from keruta_prefect.models import Task
    from keruta_prefect.settings import KerutaSettings
    from keruta_prefect.store import Store

    root = Path(tempfile.mkdtemp(prefix="keruta-bench-artifacts-"))
    store = Store(f"sqlite:///{root / 'k.db'}")
    cluster = Cluster(root / "cluster", kubelet="manual", validate=False).start()
    backend = KubernetesBackend(KerutaSettings(config_path=str(cluster.kubeconfig())), store)
    handle = backend.launch(store.create_task(Task(id="bench")), RunContext(attempt=1))
    pod = cluster.wait_for_pod(handle.name)["metadata"]["name"]
    cluster.run_pod(pod)
    files = root / "cluster" / "pods" / "default" / pod / "artifacts"
    files.mkdir(parents=True, exist_ok=True)
    cases = {}
    big = files / "big" / "big.bin"
    big.parent.mkdir(parents=True)
    with big.open("wb") as out:
        chunk = os.urandom(1 << 20)
        for _ in range(big_mib):
            out.write(chunk)
    cases[f"one file of {big_mib} MiB"] = (big.parent, big_mib * 2**20)
    small = files / "small"
    small.mkdir()
    for i in range(small_files):
        (small / f"f{i:05d}.txt").write_bytes(os.urandom(1024))
    cases[f"{small_files} files of 1 KiB"] = (small, small_files * 1024)

    rows: list[dict[str, float | str]] = []
    try:
        for label, (source, size) in cases.items():
            mount = "/.keruta/doc/" + source.name
            baseline = tar_cat(source)
            before = vm_hwm()
            start = time.perf_counter()
            result = collect_directory(backend.api, "default", pod, mount, root / "out" / source.name,
                                       max_file_size=2**40, max_total_size=2**40)
            elapsed = time.perf_counter() - start
            growth = vm_hwm() - before
            assert sum(f.size for f in result.files) == size
            rows.append({"case": label, "bytes": size, "keruta_s": elapsed, "tar_s": baseline,
                         "ratio": baseline / elapsed, "rss_growth": growth})
    finally:
        watch.stop_all()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main(big_mib: int, small_files: int) -> None:
    print("| case | keruta exec collection | tar \\| cat | ratio | peak RSS growth |\n|---|---|---|---|---|")
    for row in measure(big_mib, small_files):
        mib = float(row["bytes"]) / 2**20
        print(f"| {row['case']} | {mib / float(row['keruta_s']):.0f} MiB/s ({float(row['keruta_s']):.2f} s) | "
              f"{mib / float(row['tar_s']):.0f} MiB/s ({float(row['tar_s']):.2f} s) | {float(row['ratio']):.2f}× | "
              f"{float(row['rss_growth']) / 2**20:.1f} MiB |", flush=True)


if __name__ == "__main__":
    arguments = [int(a) for a in sys.argv[1:]]
    main(arguments[0] if arguments else 200, arguments[1] if len(arguments) > 1 else 10000)
