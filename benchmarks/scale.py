"""Many tasks at once from one process, on the Kubernetes backend (issue 15, part 3).

- :func:`thousand`: ``tasks`` tasks at once through ``KubernetesBackend.launch`` + ``wait`` + ``collect``
  (compare.py's Keruta system and its manual kubelet: a thread per task, the default artifacts mode exec),
  with the process's peak RSS, threads and open sockets sampled from /proc/self while they run, and what
  one LIST of the Pods costs at that scale: the watch's (one namespace, keruta's label selector) against
  a cluster-wide LIST of every Pod (what Prefect's worker observer does, PrefectHQ/prefect #22208);
- :func:`pipeline_scale`: ``tasks`` tasks through keruta-pipeline, ``concurrency`` at once, on the
  Kubernetes backend against the harness with its real kubelet (every agent a real process).

    .venv/bin/python -m benchmarks.scale [--tasks 1000] [--pipeline 200 --concurrency 100]

The emulator (the harness: API server, Job controller, kubelet) runs in this process too: the RSS,
threads and sockets counted are both sides'.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks import compare


def proc_status() -> dict[str, int]:
    """Threads, VmRSS and VmHWM (bytes) of this process, from /proc/self/status."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS", "VmHWM"):
            number = int(value.split()[0])
            out[key] = number if key == "Threads" else number * 1024
    return out


def open_sockets() -> int:
    """Sockets this process has open (its /proc/self/fd entries that are sockets)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # closed while we looked
            pass
    return count


class Sampler:
    """Samples threads, sockets and RSS every ``interval`` s on a thread of its own; the peaks."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak_threads = 0
        self.sockets_at_peak = 0
        self.peak_sockets = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            status, sockets = proc_status(), open_sockets()
            if status["Threads"] > self.peak_threads:
                self.peak_threads, self.sockets_at_peak = status["Threads"], sockets
            self.peak_sockets = max(self.peak_sockets, sockets)
            self.peak_rss = max(self.peak_rss, status["VmHWM"])
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, proc_status()["VmHWM"])


def list_cost(cluster: Any, path: str) -> tuple[int, float]:
    """One LIST request (``path`` on the API server, as JSON): the bytes of its answer and its seconds."""
    import urllib.request

    request = urllib.request.Request(cluster.url + path, headers={"Authorization": "Bearer harness-token",
                                                                  "Accept": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as answer:
        size = len(answer.read())
    return size, time.perf_counter() - started


WATCH_CALLS = ("list", "watch")  # the shared watch's requests (on pods, without a name)


def is_watch_call(call: Any) -> bool:
    return call.resource == "pods" and call.name is None and call.verb in WATCH_CALLS and not call.subresource


def thousand(root: Path, tasks: int = 1000, running_for: float = 5.0) -> dict[str, float]:
    """``tasks`` tasks at once in one process (compare.Keruta on the manual kubelet, a thread per task):
    completed, watches at the peak, requests (per task, the shared watch's apart), wall time, the
    process's peak RSS, threads and sockets, and the cost of one LIST of the Pods at this scale."""
    from keruta_prefect.manifest import SELECTOR

    cluster = compare.new_cluster(root)
    system = compare.Keruta(cluster)
    errors: list[str] = []
    lock = threading.Lock()
    listed: dict[str, tuple[int, float]] = {}

    def one(i: int) -> bool:
        try:
            compare.run_one(system, f"sc{i}", running_for)
            return True
        except BaseException as exc:  # counted, the first few reported
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
            return False

    def measure_lists() -> None:
        # Once every Pod exists (they all run for ``running_for`` s): the watch's LIST and the cluster-wide one.
        while len(cluster.calls_of("create", "jobs")) < tasks:
            time.sleep(0.5)
        while len(cluster.pods()) < tasks:
            time.sleep(1)
        listed["namespaced"] = list_cost(cluster, f"/api/v1/namespaces/default/pods?labelSelector={SELECTOR}")
        listed["cluster"] = list_cost(cluster, "/api/v1/pods")

    before = len(cluster.calls)
    lister = threading.Thread(target=measure_lists, daemon=True)
    with Sampler() as sampler:
        started = time.perf_counter()
        lister.start()
        done = compare.in_parallel(one, range(tasks))
        wall = time.perf_counter() - started
    lister.join(60)
    calls = [c for c in cluster.calls[before:] if c.resource]
    ours = len(listed)  # the two LISTs measured above are no part of the tasks' requests
    watch_calls = len([c for c in calls if is_watch_call(c)]) - ours
    requests = len(calls) - ours
    verbs = Counter(f"{c.verb} {c.resource}{'/' + c.subresource if c.subresource else ''}" for c in calls)
    verbs["list pods"] -= ours  # the two LISTs measured above are the benchmark's, not the tasks'
    verbs = +verbs  # (no verb left at zero)
    print("scale: requests " + ", ".join(f"{k} {v}" for k, v in verbs.most_common()), flush=True)
    kinds = Counter(error.split(" of job ")[0][:150] for error in errors)
    for kind, count in kinds.most_common(8):
        print(f"scale: {count} × {kind}", flush=True)
    compare.stop(cluster)
    out = {"scale_tasks": tasks, "scale_completed": sum(done), "scale_peak_watches": cluster.peak_watches,
           "scale_requests": requests, "scale_watch_requests": watch_calls,
           "scale_requests_per_task": (requests - watch_calls) / tasks,
           "scale_requests_per_task_amortised": requests / tasks,
           "scale_wall_s": wall, "scale_peak_rss_mib": sampler.peak_rss / 2**20,
           "scale_threads": sampler.peak_threads, "scale_sockets": sampler.sockets_at_peak,
           "scale_peak_sockets": sampler.peak_sockets}
    for verb, count in verbs.items():  # e.g. scale_requests_get_pods_log: where the requests went
        out["scale_requests_" + "_".join(verb.replace("/", " ").split())] = count
    if "namespaced" in listed:
        for scope, (size, seconds) in listed.items():
            out.update({f"scale_list_{scope}_bytes": size, f"scale_list_{scope}_s": seconds})
    return out


@contextmanager
def keruta_api() -> Iterator[tuple[str, str]]:
    """A keruta API on loopback for the agents (their reports, logs and files): its URL and token."""
    import secrets

    from keruta_prefect.api import ApiServer, create_app
    from keruta_prefect.store import get_store

    token = secrets.token_urlsafe(24)
    home = Path(os.environ.get("KERUTA_HOME", ".")) / "artifacts"
    server = ApiServer(create_app(get_store(), token, artifacts_root=home), host="127.0.0.1", port=0).start()
    try:
        yield f"http://127.0.0.1:{server.port}", token
    finally:
        server.stop()


def pipeline_scale(tasks: int = 200, concurrency: int = 100, root: Path | None = None) -> dict[str, float]:
    """``tasks`` trivial tasks through keruta-pipeline, ``concurrency`` at once, on the Kubernetes backend
    against the harness with its real kubelet (agents are real processes), in the default settings."""
    import tempfile

    from keruta_harness.cluster import Cluster

    from keruta_prefect.blocks import seed
    from keruta_prefect.pipelines import keruta_pipeline
    from keruta_prefect.settings import KerutaSettings

    root = root or Path(tempfile.mkdtemp(prefix="keruta-bench-scale-"))
    cluster = Cluster(root / uuid.uuid4().hex[:8], validate=False).start()
    block = f"bench-scale-{uuid.uuid4().hex[:6]}"
    try:
        with keruta_api() as (url, token):
            cluster.create_secret("keruta-api-token", {"token": token})
            settings = KerutaSettings(config_path=str(cluster.kubeconfig()), api_url=url)
            assert settings.artifacts_mode == "exec"  # the default
            seed(settings, name=block)
            children: list[dict[str, Any] | str] = [{"id": f"sp-{uuid.uuid4().hex[:6]}-{i:04d}", "script": "true"}
                                                    for i in range(tasks)]
            before = len(cluster.calls)
            with Sampler() as sampler:
                started = time.perf_counter()
                result = keruta_pipeline(children=children, concurrency=concurrency, backend="kubernetes",
                                         settings_block=block, concurrency_limit=None)
                wall = time.perf_counter() - started
            calls = [c for c in cluster.calls[before:] if c.resource]
            watch_calls = [c for c in calls if is_watch_call(c)]
    finally:
        compare.stop(cluster)
    return {"scale_pipeline_tasks": tasks, "scale_pipeline_concurrency": concurrency,
            "scale_pipeline_completed": result.counts().get("COMPLETED", 0), "scale_pipeline_wall_s": wall,
            "scale_pipeline_peak_watches": cluster.peak_watches, "scale_pipeline_requests": len(calls),
            "scale_pipeline_requests_per_task": (len(calls) - len(watch_calls)) / tasks,
            "scale_pipeline_peak_rss_mib": sampler.peak_rss / 2**20, "scale_pipeline_threads": sampler.peak_threads,
            "scale_pipeline_sockets": sampler.sockets_at_peak}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks at once through the backend (0: skip)")
    parser.add_argument("--running-for", type=float, default=5.0, help="seconds each Pod runs")
    parser.add_argument("--pipeline", type=int, default=0, help="tasks through keruta-pipeline (0: skip)")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--prefect-db", choices=["postgresql", "sqlite"], default="postgresql")
    args = parser.parse_args()
    for name in ("tasks", "pipeline", "concurrency"):
        if getattr(args, name) < 0 or (name == "concurrency" and args.concurrency < 1):
            parser.exit(2, f"--{name}: {getattr(args, name)} is not a valid count\n")
    from benchmarks.__main__ import _isolate, prefect_server

    home = _isolate()
    root = home / "clusters"
    if args.tasks:
        for key, value in thousand(root, args.tasks, args.running_for).items():
            print(f"{key}: {value:g}", flush=True)
    if args.pipeline:
        with prefect_server(args.prefect_db, home):
            for key, value in pipeline_scale(args.pipeline, args.concurrency, root).items():
                print(f"{key}: {value:g}", flush=True)


if __name__ == "__main__":
    main()
