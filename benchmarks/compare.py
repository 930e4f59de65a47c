"""keruta-prefect side by side with prefect-kubernetes on the same Kubernetes emulator.

Each system gets its own harness cluster (tests/harness: kmock plus a Job controller, selectors,
resourceVersions, pods/log) with the *manual* kubelet: the benchmark writes Pod status itself and the
harness' Job controller turns it into Job status, as a real cluster would. Requests are counted where
the API server receives them.

- keruta: ``KubernetesBackend.launch`` + ``wait`` + ``collect`` (the code the keruta-task flow runs), in the
  default settings (artifacts mode exec): the agent, played by the benchmark, reports its final status
  through the store, says it holds its files (the Pod log line the real agent writes), and its container
  ends once the collection has touched the marker (as keruta-agent does);
- prefect-kubernetes: ``KubernetesJob(...).trigger().wait_for_completion()`` (default 5 s interval);
- bare: one official-client watch on the Job (the practical limit).
"""

from __future__ import annotations

import contextvars
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keruta_harness.cluster import Cluster

POD_TIMEOUT = 120  # seconds the Job controller may take to make a task's Pod (a thousand Jobs at once queue)
TASK_TIMEOUT = 300  # seconds run_one waits for a task's wait() (and collection) to return


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def new_cluster(root: Path) -> Cluster:
    return Cluster(root / uuid.uuid4().hex[:8], kubelet="manual", validate=False).start()


def agent_reports_completed(store: Any, task_id: str) -> None:
    """What the agent does before its container ends: report COMPLETED through the keruta API."""
    from keruta_prefect.models import TaskStatus

    store.set_status(task_id, TaskStatus.IN_PROGRESS)
    store.set_status(task_id, TaskStatus.COMPLETED)


def agent_finishes(cluster: Cluster, store: Any, task_id: str, pod: str) -> float:
    """keruta-agent's end in exec mode (the default), on the manual kubelet: a file to collect, the final
    report, the Pod log line that says it holds its files; its container ends when the collection has
    touched the marker. Returns when the final report was written (time.perf_counter())."""
    from keruta_prefect.contract import COLLECTED_MARKER, READY_LINE

    files = cluster.root / "pods" / "default" / pod / "artifacts"  # the Pod's artifacts volume
    files.mkdir(parents=True, exist_ok=True)
    (files / "report.txt").write_text("made by the task\n")
    agent_reports_completed(store, task_id)
    written = time.perf_counter()
    cluster.log(pod, f"keruta-agent INFO {READY_LINE} in /.keruta/doc; holding up to 300s for collection")
    holders(cluster).hold(files / COLLECTED_MARKER, pod)
    return written


class Holders:
    """The agents of a cluster's Pods holding their files: each looks for its marker every 20 ms (as
    keruta-agent does) and then ends its container. One thread looks for all of them: a thread per Pod,
    a thousand of them polling, would take the CPU the measured code needs."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.pending: dict[Path, tuple[str, float]] = {}  # marker -> (Pod, deadline)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="bench-agents").start()

    def hold(self, marker: Path, pod: str) -> None:
        with self.lock:
            self.pending[marker] = (pod, time.monotonic() + 120)

    def _run(self) -> None:
        while not self.stopped.wait(0.02):
            with self.lock:
                pending = list(self.pending.items())
            for marker, (pod, deadline) in pending:
                if marker.exists():
                    self.cluster.log(pod, "keruta-agent INFO artifacts collected; exiting")
                    self.cluster.finish_pod(pod)
                elif time.monotonic() < deadline:
                    continue
                else:
                    print(f"benchmark agent of Pod {pod}: its files were not collected within 120s", flush=True)
                with self.lock:
                    del self.pending[marker]


_holders: dict[int, Holders] = {}
_holders_lock = threading.Lock()


def holders(cluster: Cluster) -> Holders:
    """The holding agents of ``cluster`` (one thread, started on first use; compare.stop() ends it)."""
    with _holders_lock:
        if id(cluster) not in _holders:
            _holders[id(cluster)] = Holders(cluster)
        return _holders[id(cluster)]


# --- the three systems ------------------------------------------------------------------------------

class Keruta:
    name = "keruta-prefect"

    def __init__(self, cluster: Cluster) -> None:
        from keruta_prefect.backends.kubernetes import KubernetesBackend
        from keruta_prefect.settings import KerutaSettings
        from keruta_prefect.store import get_store

        self.cluster, self.store = cluster, get_store()
        self.backend = KubernetesBackend(KerutaSettings(config_path=str(cluster.kubeconfig())), self.store)
        assert self.backend.settings.artifacts_mode == "exec"  # the default
        self.tasks: dict[str, str] = {}

    def start(self, label: str) -> tuple[str, Callable[[], Any]]:
        from keruta_prefect.backends.base import RunContext
        from keruta_prefect.models import Task

        task = self.store.create_task(Task(id=f"{label}-{uuid.uuid4().hex[:6]}"))
        handle = self.backend.launch(task, RunContext(attempt=1))
        self.tasks[handle.name] = task.id

        def wait() -> Any:
            outcome = self.backend.wait(handle)
            waited = time.perf_counter()  # the outcome is known: what completion detection measures
            dest = self.cluster.root / "collected" / task.id
            collected = self.backend.collect(handle, dest)
            assert collected.lost is None, collected.lost
            return outcome, waited

        return handle.name, wait

    def finish(self, job: str, pod: str) -> float:
        return agent_finishes(self.cluster, self.store, self.tasks[job], pod)


class PrefectKubernetes:
    name = "prefect-kubernetes"

    def __init__(self, cluster: Cluster) -> None:
        from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials

        self.cluster = cluster
        self.credentials = KubernetesCredentials(cluster_config=KubernetesClusterConfig.from_file(
            path=cluster.kubeconfig(), context_name="harness"))

    def start(self, label: str) -> tuple[str, Callable[[], Any]]:
        from prefect_kubernetes.jobs import KubernetesJob

        name = f"{label}-{uuid.uuid4().hex[:6]}"
        manifest = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "default"},
                    "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
                        {"name": "main", "image": "busybox", "command": ["true"]}]}}}}
        job = KubernetesJob(v1_job=manifest, credentials=self.credentials, namespace="default")
        run = job.trigger()
        return name, run.wait_for_completion

    def finish(self, job: str, pod: str) -> float:
        written = time.perf_counter()
        self.cluster.finish_pod(pod)
        return written


class BareWatch:
    name = "bare official-client watch"

    def __init__(self, cluster: Cluster) -> None:
        import kubernetes

        self.cluster = cluster
        self.api = kubernetes.config.new_client_from_config(str(cluster.kubeconfig()))
        self.batch = kubernetes.client.BatchV1Api(self.api)

    def start(self, label: str) -> tuple[str, Callable[[], Any]]:
        import kubernetes

        name = f"{label}-{uuid.uuid4().hex[:6]}"
        self.batch.create_namespaced_job("default", {
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "main", "image": "busybox", "command": ["true"]}]}}}})

        def wait() -> None:
            watch = kubernetes.watch.Watch()
            for event in watch.stream(self.batch.list_namespaced_job, "default", field_selector=f"metadata.name={name}",
                                      timeout_seconds=120):
                conditions = (event["object"].status.conditions or []) if event["object"].status else []
                if any(c.type in ("Complete", "Failed") and c.status == "True" for c in conditions):
                    watch.stop()
                    return

        return name, wait

    def finish(self, job: str, pod: str) -> float:
        written = time.perf_counter()
        self.cluster.finish_pod(pod)
        return written


def run_one(system: Any, label: str, running_for: float, offset: Callable[[], float] = lambda: 0.3) -> dict[str, Any]:
    """Start a task, let its Pod run for ``running_for`` s, finish it; measure from the status write."""
    cluster: Cluster = system.cluster
    before = len(cluster.calls)
    started = time.perf_counter()
    job, wait = system.start(label)
    done: dict[str, float] = {}
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            answer = wait()
            # keruta's wait also collects the files: the outcome was known when its wait() returned
            done["known"] = answer[1] if isinstance(answer, tuple) else time.perf_counter()
        except BaseException as exc:  # reported below
            errors.append(exc)
        done["at"] = time.perf_counter()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    pod = cluster.wait_for_pod(job, timeout=POD_TIMEOUT)["metadata"]["name"]
    cluster.run_pod(pod)
    time.sleep(running_for + offset())
    written = system.finish(job, pod)
    thread.join(TASK_TIMEOUT)
    if errors:
        raise errors[0]
    if "known" not in done:
        raise TimeoutError(f"the wait for Job {job} did not return within {TASK_TIMEOUT}s")
    calls = [c for c in cluster.calls[before:] if c.resource and c.name in (None, job, pod)]
    return {"latency": done["known"] - written, "calls": calls, "wall": done["at"] - started}


# --- the measurements -------------------------------------------------------------------------------

def completion_detection(root: Path, runs: int) -> dict[str, dict[str, float]]:
    """From the terminal status write to the waiting code's return: p50/p95 over ``runs``."""
    out: dict[str, dict[str, float]] = {}
    for factory, parallel, offset in ((Keruta, 1, lambda: 0.3), (BareWatch, 1, lambda: 0.3),
                                      (PrefectKubernetes, 6, lambda: random.uniform(0, 5))):
        cluster = new_cluster(root)
        system = factory(cluster)
        latencies: list[float] = []
        lock = threading.Lock()

        def one(i: int, system: Any = system, offset: Callable[[], float] = offset,
                latencies: list[float] = latencies, lock: threading.Lock = lock) -> None:
            result = run_one(system, f"cd{i}", 0, offset)
            with lock:
                latencies.append(result["latency"])

        for batch in range(0, runs, parallel):
            in_parallel(lambda i: one(i), range(batch, min(runs, batch + parallel)))
        out[system.name] = {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95), "n": len(latencies)}
        stop(cluster)
    return out


def requests_per_task(root: Path, durations: tuple[int, ...]) -> dict[str, dict[int, Counter[str]]]:
    """Requests one task costs at the API server, by how long its Pod runs; every (system, duration)
    on its own cluster, all at once."""
    results: dict[str, dict[int, Counter[str]]] = {}
    clusters = []
    threads = []
    for factory in (Keruta, PrefectKubernetes):
        for seconds in durations:
            cluster = new_cluster(root)
            clusters.append(cluster)
            system = factory(cluster)

            def measure(system: Any = system, seconds: int = seconds) -> None:
                result = run_one(system, f"rq{seconds}", seconds)
                counts = Counter(f"{c.verb} {c.resource}{'/' + c.subresource if c.subresource else ''}"
                                 for c in result["calls"])
                results.setdefault(system.name, {})[seconds] = counts

            threads.append(measure)
    in_parallel(lambda fn: fn(), threads)
    for cluster in reversed(clusters):  # kmock servers stack DNS interceptors: last started, first stopped
        stop(cluster)
    return results


def concurrent_tasks(root: Path, tasks: int, running_for: float) -> dict[str, dict[str, float]]:
    """``tasks`` tasks at once in one process: open watches at the peak, requests, requests per second."""
    out: dict[str, dict[str, float]] = {}
    for factory in (Keruta, PrefectKubernetes):
        cluster = new_cluster(root)
        system = factory(cluster)
        before = len(cluster.calls)
        started = time.perf_counter()
        in_parallel(lambda i, system=system: run_one(system, f"cc{i}", running_for), range(tasks))
        wall = time.perf_counter() - started
        calls = [c for c in cluster.calls[before:] if c.resource]
        out[system.name] = {"peak_watches": cluster.peak_watches, "requests": len(calls),
                            "requests_per_s": len(calls) / wall, "wall": wall}
        stop(cluster)
    return out


def orchestration_overhead(root: Path, runs: int) -> dict[str, float]:
    """keruta-task flow on the Kubernetes backend in the default settings (artifacts mode exec): flow start
    → Job create received, and the agent's final report → run recorded, its files collected over exec
    (and → flow returned), against an empty Prefect flow measured in the same server."""
    from prefect import flow

    from keruta_prefect.blocks import seed
    from keruta_prefect.flows import keruta_task
    from keruta_prefect.settings import KerutaSettings
    from keruta_prefect.store import get_store

    marks: dict[str, float] = {}

    @flow(name="empty")
    def empty() -> None:
        marks["body"] = time.perf_counter()

    cluster = new_cluster(root)
    block = f"bench-{uuid.uuid4().hex[:6]}"
    settings = KerutaSettings(config_path=str(cluster.kubeconfig()))
    assert settings.artifacts_mode == "exec"  # the default
    seed(settings, name=block)
    store = get_store()
    empty_start: list[float] = []
    empty_end: list[float] = []
    to_create: list[float] = []
    to_record: list[float] = []
    to_return: list[float] = []
    # The empty flow and the keruta-task flow take turns, in the same process with the same cluster running:
    # both see the same machine (the emulator shares this process; the server warms up as they go).
    for i in range(runs):
        t = time.perf_counter()
        empty()
        end = time.perf_counter()
        empty_start.append(marks["body"] - t)
        empty_end.append(end - marks["body"])

        task_id = f"oh-{i}-{uuid.uuid4().hex[:4]}"
        before = len(cluster.calls)
        holder: dict[str, float] = {}

        def run(task_id: str = task_id, holder: dict[str, float] = holder) -> None:
            keruta_task(task_spec={"id": task_id, "script": "true"}, backend="kubernetes", settings_block=block)
            holder["returned"] = time.perf_counter()

        started = time.perf_counter()
        # The run's thread gets this context: Prefect's settings (the API URL) live in a context variable.
        thread = threading.Thread(target=contextvars.copy_context().run, args=(run,))
        thread.start()
        create = cluster.wait_for(lambda before=before: next(
            (c for c in cluster.calls[before:] if c.verb == "create" and c.resource == "jobs"), None), 60)
        pod = cluster.wait_for_pod(create.name)["metadata"]["name"]
        cluster.run_pod(pod)
        time.sleep(0.3)
        written = agent_finishes(cluster, store, task_id, pod)  # it holds until its files are collected
        while not store.runs(task_id) or store.runs(task_id)[-1].finished_at is None:
            time.sleep(0.002)
        recorded = time.perf_counter()
        thread.join(60)
        [run] = store.runs(task_id)
        assert run.artifacts_note is None and [a.path for a in store.artifacts(task_id)] == ["report.txt"], \
            (run.artifacts_note, store.artifacts(task_id))
        to_create.append(create.at - started)
        to_record.append(recorded - written)
        to_return.append(holder["returned"] - written)
    stop(cluster)
    return {"empty_start": statistics.median(empty_start), "empty_end": statistics.median(empty_end),
            "to_create": statistics.median(to_create), "to_record": statistics.median(to_record),
            "to_return": statistics.median(to_return), "runs": runs}


def in_parallel(fn: Callable[[Any], Any], items: Any) -> list[Any]:
    """``fn`` on every item, each in its own thread; the first error is raised."""
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        return list(pool.map(fn, items))


def stop(cluster: Cluster) -> None:
    from keruta_prefect.backends.kubernetes import watch

    watch.stop_all()
    with _holders_lock:
        held = _holders.pop(id(cluster), None)
    if held is not None:
        held.stopped.set()
    try:
        cluster.stop()
    except TimeoutError:  # measured already: an emulator that does not stop in time changes no figure
        print("benchmarks: a harness cluster did not stop within 20 s (its server is left to the process's end)",
              flush=True)
