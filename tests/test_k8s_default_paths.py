"""The Kubernetes backend on its default paths (artifacts mode exec), and what goes wrong there: a
wait that stalls behind a holding agent, a stalled or broken exec, a dead watch or log follower, a
wait without bound, a cancel that gives up silently, leaks per collection. Every test runs against the
harness cluster over real HTTP (tests/harness), with faults injected there; those without faults run on a real
cluster too (tests/targets.py)."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from keruta_harness.cluster import Cluster

from keruta_prefect.backends.base import BackendError, Outcome, RunContext, RunHandle, TransientBackendError
from keruta_prefect.backends.kubernetes import KubernetesBackend, watch
from keruta_prefect.backends.kubernetes.watch import WatchTuning
from keruta_prefect.models import Task
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store
from tests.conftest import Api
from tests.targets import Target
from tests.waiting import eventually


def fast(**extra: Any) -> WatchTuning:
    """The shared watch's test timeouts (as tests/conftest.py sets them), and short bounds for the rest."""
    values: dict[str, Any] = {"server_timeout": 5, "read_timeout": 4, "backoff": 0.1, "idle_seconds": 2,
                              "sync_timeout": 2, "exec_read_timeout": 2, "cancel_wait": 2, **extra}
    known = WatchTuning.__dataclass_fields__  # (so that this file also runs against older code, to compare)
    return WatchTuning(**{k: v for k, v in values.items() if k in known})


def settings_for(cluster: Target, api: Api | None = None, **extra: Any) -> KerutaSettings:
    """Default settings (artifacts mode exec) against the test's cluster."""
    return cluster.settings(api_url=api.url if api else "http://keruta-api:8080", image_pull_grace_seconds=1, **extra)


def final_reports(store: Store, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """When (time.perf_counter) the keruta API stored each task's final status: the agent's final report."""
    seen: dict[str, float] = {}
    original = store.set_status

    def recording(task_id: str, status: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(task_id, status, *args, **kwargs)
        if str(status) in ("COMPLETED", "FAILED"):
            seen.setdefault(task_id, time.perf_counter())
        return result

    monkeypatch.setattr(store, "set_status", recording)
    return seen


def follower_threads(pod: str | None = None) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"keruta-log-{pod or ''}") and t.is_alive()]


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """``fn`` in a thread; its result (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def k8s_api(cluster: Target, api: Api) -> Iterator[tuple[Target, Api]]:
    cluster.create_secret("keruta-api-token", {"token": api.token})
    yield cluster, api


# --- 1. no stall after the agent's final report ------------------------------------------------------

def test_exec_mode_wait_returns_right_after_the_final_report_and_the_log_goes_on(
        k8s_api: tuple[Target, Api], store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cluster, api = k8s_api
    reported = final_reports(store, monkeypatch)
    settings = settings_for(cluster, api, artifacts_hold_timeout=120)
    assert settings.artifacts_mode == "exec"  # the default
    backend = KubernetesBackend(settings, store, tuning=fast())
    task = store.create_task(Task.model_validate(
        {"id": "d-exec", "script": "echo made > $KERUTA_ARTIFACTS_DIR/out.txt\necho done"}))
    handle = backend.launch(task, RunContext(attempt=1))
    lines: list[tuple[str, str]] = []
    outcome = backend.wait(handle, lambda level, text: lines.append((level, text)))
    returned = time.perf_counter()
    assert outcome.status == "COMPLETED"
    latency = returned - reported["d-exec"]
    print(f"final report → wait() returned: {latency * 1000:.1f} ms")
    assert latency < 1.0, latency  # was 15 s: the join of a follower whose container holds on
    [pod] = [p["metadata"]["name"] for p in cluster.pods(job=handle.name)]
    assert cluster.pods(job=handle.name)[0]["status"]["phase"] == "Running"  # holding its files
    assert follower_threads(pod)  # following on, on its own

    result = backend.collect(handle, tmp_path / "files")
    assert result.lost is None and [f.path for f in result.files] == ["out.txt"]
    cluster.wait_for(lambda: not follower_threads(pod), what="the follower to end with its container")
    # The agent's last words after the release still reached the store and the run log.
    assert any("artifacts collected; exiting" in r.message for r in store.logs("d-exec"))
    assert ("INFO", "keruta-agent INFO artifacts collected; exiting") in lines


@pytest.mark.parametrize("mode", ["off", "upload"])
def test_modes_without_a_hold_return_right_after_the_container_ends(
        k8s_api: tuple[Target, Api], store: Store, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    cluster, api = k8s_api
    reported = final_reports(store, monkeypatch)
    backend = KubernetesBackend(settings_for(cluster, api, artifacts_mode=mode), store, tuning=fast())
    task = store.create_task(Task.model_validate({"id": f"d-{mode}", "script": "echo hi"}))
    handle = backend.launch(task, RunContext(attempt=1))
    outcome = backend.wait(handle)
    returned = time.perf_counter()
    assert outcome.status == "COMPLETED"
    latency = returned - reported[task.id]
    print(f"{mode}: final report → wait() returned: {latency * 1000:.1f} ms")
    assert latency < 3.0, latency
    assert not follower_threads()  # the container ended: its follower is done, nothing handed on


def test_a_wait_after_the_container_ended_returns_at_once_with_the_whole_log(
        k8s_api: tuple[Target, Api], store: Store) -> None:
    cluster, api = k8s_api
    backend = KubernetesBackend(settings_for(cluster, api, artifacts_mode="off"), store, tuning=fast())
    task = store.create_task(Task.model_validate({"id": "d-late", "script": "echo one\necho two"}))
    handle = backend.launch(task, RunContext(attempt=1))
    cluster.wait_for(lambda: any(c.get("type") == "Complete" for c in
                                 ((cluster.job(handle.name) or {}).get("status") or {}).get("conditions") or []),
                     timeout=60, what="the Job to complete")
    lines: list[str] = []
    started = time.perf_counter()
    outcome = backend.wait(handle, lambda _level, text: lines.append(text))
    elapsed = time.perf_counter() - started
    assert outcome.status == "COMPLETED"
    assert elapsed < 3.0, elapsed
    assert "one" in lines and "two" in lines
    assert not follower_threads()


@pytest.mark.harness_only("a manual kubelet ends the Pod before the wait subscribes")
def test_a_pod_that_changed_before_the_wait_subscribed_is_seen_at_once(
        manual_cluster: Cluster, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared watch saw the Pod end before this wait subscribed (a fast start, a reattach): no event will
    come for it, so the wait must look at once, not after its first 0.5 s timeout."""
    cluster = manual_cluster
    waits: list[float] = []  # how long each of this wait's looks at its subscription could block
    original_get = watch.Subscription.get
    waiter = threading.get_ident()

    def get(self: watch.Subscription, timeout: float) -> Any:
        if threading.get_ident() == waiter:
            waits.append(timeout)
        return original_get(self, timeout)

    backend = KubernetesBackend(settings_for(cluster, artifacts_mode="off"), store, tuning=fast())
    handle = backend.launch(store.create_task(Task(id="d-early")), RunContext(attempt=1))
    pod = cluster.wait_for_pod(handle.name)["metadata"]["name"]
    other = watch.subscribe(backend.api, "default", backend.tuning, handle.name)  # keeps the shared watch alive
    try:
        cluster.run_pod(pod)
        cluster.log(pod, "keruta-agent INFO done")
        cluster.end_log(pod)
        cluster.finish_pod(pod, 0)
        cluster.wait_for(lambda: any("terminated" in (s.get("state") or {}) for p in other.pods()
                                     for s in (p.get("status") or {}).get("containerStatuses") or []),
                         what="the shared watch to see the container end")
        monkeypatch.setattr(watch.Subscription, "get", get)
        outcome = backend.wait(handle)
    finally:
        other.close()
    assert outcome.status == "COMPLETED"
    assert waits == [0.0], waits  # one look, at once (it used to be a 0.5 s wait for an event first)


# --- 14e: levels of the Pod log lines ----------------------------------------------------------------

@pytest.mark.harness_only("a manual kubelet writes the Pod's log lines")
def test_the_agents_own_lines_keep_their_level_and_the_scripts_lines_are_info(
        manual_cluster: Cluster, store: Store) -> None:
    cluster = manual_cluster
    backend = KubernetesBackend(settings_for(cluster, artifacts_mode="off"), store, tuning=fast())
    handle = backend.launch(store.create_task(Task(id="d-levels")), RunContext(attempt=1))
    pod = cluster.wait_for_pod(handle.name)["metadata"]["name"]
    seen: list[tuple[str, str]] = []
    waiter, outcome = in_thread(lambda: backend.wait(handle, lambda level, text: seen.append((level, text))))
    cluster.run_pod(pod)
    script_lines = ["build ERROR in step 3 is only a word", "x WARNING y", "Traceback (most recent call last):",
                    "ERROR: from the script's stderr"]
    agent_lines = ["keruta-agent WARNING retrying the keruta API", "keruta-agent ERROR 2 log lines not sent",
                   "keruta-agent INFO started", "keruta-agent DEBUG detail", "keruta-agent CRITICAL gone"]
    cluster.log(pod, *script_lines, *agent_lines)
    cluster.wait_for(lambda: len(seen) >= len(script_lines) + len(agent_lines), what="the lines")
    cluster.finish_pod(pod, 0)
    waiter.join(30)
    assert outcome and isinstance(outcome[0], Outcome)
    levels = dict((text, level) for level, text in seen)
    assert {levels[text] for text in script_lines} == {"INFO"}
    assert [levels[text] for text in agent_lines] == ["WARN", "ERROR", "INFO", "DEBUG", "CRITICAL"]
    stored = {r.message: r.level for r in store.logs("d-levels")}
    assert stored["keruta-agent WARNING retrying the keruta API"] == "WARN"
    assert stored["keruta-agent ERROR 2 log lines not sent"] == "ERROR"
    from keruta_prefect.backends.kubernetes.logs import line_level

    assert line_level("keruta-agentX ERROR no") == "INFO" and line_level("") == "INFO"


# --- 4. collection never raises; a stalled or broken exec ends in bounded time -----------------------

def holding_pod(cluster: Cluster, store: Store, task_id: str, **tuning: Any) -> tuple[KubernetesBackend, RunHandle,
                                                                                       str, Path]:
    """A Pod whose agent (played by the test) holds its files: main container running, files in place."""
    backend = KubernetesBackend(settings_for(cluster), store, tuning=fast(**tuning))
    handle = backend.launch(store.create_task(Task(id=task_id)), RunContext(attempt=1))
    pod = cluster.wait_for_pod(handle.name)["metadata"]["name"]
    cluster.run_pod(pod)
    files = cluster.root / "pods" / "default" / pod / "artifacts"
    files.mkdir(parents=True, exist_ok=True)
    for name in ("a.txt", "b.txt"):
        (files / name).write_bytes(name.encode() * 256)  # 1280 bytes each: 3 blocks of the tar stream
    cluster.wait_for(lambda: backend._holding_pod(handle) == pod, what="the watch to see the Pod running")
    return backend, handle, pod, files


@pytest.mark.harness_only("the exec is stalled on purpose")
def test_a_stalled_exec_loses_the_files_with_a_reason_in_bounded_time(
        manual_cluster: Cluster, store: Store, tmp_path: Path) -> None:
    cluster = manual_cluster
    backend, handle, pod, _files = holding_pod(cluster, store, "d-stall", exec_read_timeout=1)
    cluster.stall_exec(2)  # the tar and the release both stall
    collector, result = in_thread(lambda: backend.collect(handle, tmp_path / "out"))
    collector.join(15)
    assert result, "collect() did not end"
    assert not isinstance(result[0], BaseException), repr(result[0])
    assert result[0].lost == (f"artifacts lost: the exec into Pod {pod} sent nothing for 1s (stalled); "
                              "the files were not collected")
    assert [c[0] for c in cluster.exec_commands] == ["tar", "touch"]  # the release was still tried


@pytest.mark.parametrize("after", [512 * 3 + 700, 512 * 4], ids=["mid-file", "between-files"])
@pytest.mark.harness_only("the exec's connection is broken on purpose")
def test_an_exec_that_breaks_mid_stream_keeps_nothing_and_says_why(
        manual_cluster: Cluster, store: Store, tmp_path: Path, after: int) -> None:
    """Cut inside a file, or exactly after one (a tar reader alone sees a shorter, valid archive)."""
    cluster = manual_cluster
    backend, handle, pod, _files = holding_pod(cluster, store, "d-break")
    cluster.break_exec(after)
    collector, result = in_thread(lambda: backend.collect(handle, tmp_path / "out"))
    collector.join(15)
    assert result and not isinstance(result[0], BaseException), result
    assert result[0].files == []
    assert result[0].lost is not None and result[0].lost.startswith(
        f"artifacts lost: the connection to Pod {pod} broke while its files were sent"), result[0].lost
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert cluster.exec_commands[-1][0] == "touch"


@pytest.mark.harness_only("a manual kubelet holds the Pod, its files put there from this machine")
def test_files_that_cannot_be_written_are_lost_with_a_reason_not_raised(
        manual_cluster: Cluster, store: Store, tmp_path: Path) -> None:
    backend, handle, _pod, _files = holding_pod(manual_cluster, store, "d-dest")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    result = backend.collect(handle, blocker / "attempt-1")
    assert result.lost is not None and result.lost.startswith(
        f"artifacts lost: cannot write them under {blocker / 'attempt-1'}"), result.lost
    assert manual_cluster.exec_commands[-1][0] == "touch"


@pytest.mark.harness_only("a manual kubelet holds the Pod, its files put there from this machine; execs are counted")
def test_collections_do_not_leak_clients_sockets_or_threads(manual_cluster: Cluster, store: Store,
                                                            tmp_path: Path) -> None:
    backend, handle, _pod, _files = holding_pod(manual_cluster, store, "d-leak")

    def sockets() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
            except OSError:
                pass
        return count

    def clients() -> int:
        return sum(isinstance(o, kubernetes.client.ApiClient) for o in gc.get_objects())

    assert backend.collect(handle, tmp_path / "warm-up").lost is None  # one-time set-up happens here
    gc.collect()
    gc.disable()  # no collection may tidy up behind the code's back
    try:
        before_sockets, before_clients = sockets(), clients()
        before_threads = {t.ident for t in threading.enumerate()}
        for n in range(8):
            result = backend.collect(handle, tmp_path / f"run-{n}")
            assert result.lost is None and {"a.txt", "b.txt"} <= {f.path for f in result.files}
        assert clients() == before_clients
        manual_cluster.wait_for(lambda: sockets() <= before_sockets, timeout=10,
                                what=f"sockets back to {before_sockets} (now {sockets()})")
        assert {t.ident for t in threading.enumerate()} <= before_threads
    finally:
        gc.enable()
    assert [c[0] for c in manual_cluster.exec_commands].count("touch") == 9


# --- 5. the watch and the followers never die silently; wait() is bounded -----------------------------

def start_wait(cluster: Cluster, store: Store, task_id: str, tuning: WatchTuning,
               on_log: Callable[[str, str], None] | None = None,
               **settings: Any) -> tuple[KubernetesBackend, RunHandle, str, threading.Thread, list[Any]]:
    backend = KubernetesBackend(settings_for(cluster, artifacts_mode="off", **settings), store, tuning=tuning)
    handle = backend.launch(store.create_task(Task(id=task_id)), RunContext(attempt=1))
    pod = cluster.wait_for_pod(handle.name)["metadata"]["name"]
    waiter, outcome = in_thread(lambda: backend.wait(handle, on_log))
    cluster.wait_for(lambda: cluster.watches(), what="the watch")
    return backend, handle, pod, waiter, outcome


@pytest.mark.harness_only("raw lines are injected into the watch stream")
def test_a_blank_line_or_a_malformed_event_on_the_watch_is_logged_and_the_watch_goes_on(
        manual_cluster: Cluster, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    cluster = manual_cluster
    caplog.set_level(logging.WARNING, "keruta.kubernetes")
    _backend, _handle, pod, waiter, outcome = start_wait(cluster, store, "d-blank", fast())
    [stream] = cluster.watches()
    cluster.inject_watch_lines(b"\n")
    cluster.wait_for(lambda: not stream.inject, what="the blank line to be sent")
    cluster.run_pod(pod)
    cluster.inject_watch_lines(b'{"type": "ADDED"}\n')  # no object: the client itself fails on it
    cluster.wait_for(lambda: any(r.exc_info for r in caplog.records), what="the error to be logged")
    cluster.finish_pod(pod, 0)
    waiter.join(20)
    assert outcome and isinstance(outcome[0], Outcome) and outcome[0].status == "COMPLETED", outcome
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.levelno >= logging.WARNING and "unexpected error" in record.getMessage()
    assert all(w.thread.is_alive() for w in watch.active_watches())


@pytest.mark.harness_only("a manual kubelet ends the Pod when the test says")
def test_a_watch_that_ends_under_a_waiter_is_replaced(manual_cluster: Cluster, store: Store) -> None:
    cluster = manual_cluster
    _backend, _handle, pod, waiter, outcome = start_wait(cluster, store, "d-dead", fast())
    [first] = watch.active_watches()
    first.stop()  # gone, as if its thread had died
    cluster.wait_for(lambda: watch.active_watches() and watch.active_watches()[0] is not first,
                     what="a new watch")
    cluster.finish_pod(pod, 0)
    waiter.join(20)
    assert outcome and isinstance(outcome[0], Outcome) and outcome[0].status == "COMPLETED", outcome


@pytest.mark.harness_only("a manual kubelet ends the Pod when the test says")
def test_a_watch_thread_that_dies_says_so_and_its_waiter_moves_on(
        manual_cluster: Cluster, store: Store, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    cluster = manual_cluster
    caplog.set_level(logging.WARNING, "keruta.kubernetes")
    _backend, _handle, pod, waiter, outcome = start_wait(cluster, store, "d-died", fast())
    [first] = watch.active_watches()
    original = watch.NamespaceWatch._dispatch

    def dying(self: watch.NamespaceWatch, kind: str, obj: dict[str, Any]) -> None:
        if self is first:
            raise SystemExit("the watch thread dies")  # not an Exception: nothing in the loop catches it
        original(self, kind, obj)

    monkeypatch.setattr(watch.NamespaceWatch, "_dispatch", dying)
    cluster.run_pod(pod)
    cluster.wait_for(lambda: not first.thread.is_alive(), what="the first watch's thread to end")
    cluster.finish_pod(pod, 0)
    waiter.join(20)
    assert outcome and isinstance(outcome[0], Outcome) and outcome[0].status == "COMPLETED", outcome
    assert any(r.levelno == logging.ERROR and r.exc_info and "ended unexpectedly" in r.getMessage()
               for r in caplog.records)
    assert any("SystemExit: the watch thread dies" in r.getMessage() for r in caplog.records)  # the waiter's word


@pytest.mark.harness_only("injects 500s into every list of Pods")
def test_a_watch_that_cannot_list_ends_the_wait_with_a_transient_error(
        manual_cluster: Cluster, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    cluster = manual_cluster
    caplog.set_level(logging.WARNING, "keruta.kubernetes")
    backend = KubernetesBackend(settings_for(cluster, artifacts_mode="off"), store,
                                tuning=fast(sync_timeout=1, unsynced_limit=2))
    handle = backend.launch(store.create_task(Task(id="d-unsynced")), RunContext(attempt=1))
    cluster.fail(10_000, 500, verb="list", resource="pods")
    waiter, outcome = in_thread(lambda: backend.wait(handle))
    waiter.join(20)
    cluster.faults.clear()
    assert outcome and isinstance(outcome[0], TransientBackendError), outcome
    assert "has not listed them" in str(outcome[0]) and "HTTP 500" in str(outcome[0])
    assert any("has not listed them within" in r.getMessage() for r in caplog.records)  # subscribe said so


@pytest.mark.harness_only("a manual kubelet keeps the Pod Pending; the delete is read from the API server's requests")
def test_wait_is_bounded_and_then_fails_the_attempt_and_deletes_the_job(manual_cluster: Cluster,
                                                                       store: Store) -> None:
    """The cluster never tells (the Pod stays Pending): past the bound the attempt fails, the Job goes."""
    cluster = manual_cluster
    backend = KubernetesBackend(settings_for(cluster, artifacts_mode="off"), store, tuning=fast(wait_limit=2))
    handle = backend.launch(store.create_task(Task(id="d-bound")), RunContext(attempt=1))
    waiter, outcome = in_thread(lambda: backend.wait(handle))
    waiter.join(20)
    assert outcome and isinstance(outcome[0], Outcome), outcome
    assert (outcome[0].status, outcome[0].reason) == ("FAILED", "WAIT_DEADLINE")
    assert f"no end of Job {handle.name} was seen within 2s" in outcome[0].message
    assert [c.name for c in cluster.calls_of("delete", "jobs")] == [handle.name]


def test_the_default_bound_is_the_jobs_deadline_plus_a_margin(cluster: Target, store: Store) -> None:
    backend = KubernetesBackend(settings_for(cluster, artifacts_hold_timeout=60), store)
    handle = backend.launch(store.create_task(Task.model_validate({"id": "d-deadline", "timeoutSeconds": 100})),
                            RunContext(attempt=1))
    job = cluster.job(handle.name)
    assert job is not None
    assert backend._wait_limit(handle) == job["spec"]["activeDeadlineSeconds"] + backend.tuning.deadline_margin


def test_a_failing_log_callback_is_logged_and_the_ready_line_still_counts(
        k8s_api: tuple[Target, Api], store: Store, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    cluster, api = k8s_api
    caplog.set_level(logging.WARNING, "keruta.kubernetes")
    original = store.add_logs

    def broken_store(task_id: str, source: str, *args: Any, **kwargs: Any) -> Any:
        if source.startswith("pod/"):  # the backend's writes fail; the keruta API's go through
            raise RuntimeError("database is locked")
        return original(task_id, source, *args, **kwargs)

    def broken_sink(_level: str, _text: str) -> None:
        raise RuntimeError("the run log is gone")

    monkeypatch.setattr(store, "add_logs", broken_store)
    # The agent holds its files until they are collected (an hour at most): wait() must not wait for that.
    backend = KubernetesBackend(settings_for(cluster, api, artifacts_hold_timeout=3600), store, tuning=fast())
    task = store.create_task(Task.model_validate(  # lines before the agent's "artifacts ready"
        {"id": "d-callback", "script": "echo first\necho second >&2\necho x > $KERUTA_ARTIFACTS_DIR/f"}))
    handle = backend.launch(task, RunContext(attempt=1))
    _waiter, outcome = in_thread(lambda: backend.wait(handle, broken_sink))
    eventually(lambda: outcome, what="wait() to return")
    assert isinstance(outcome[0], Outcome) and outcome[0].status == "COMPLETED", outcome
    assert [p["status"]["phase"] for p in cluster.pods(job=handle.name)] == ["Running"]  # still holding
    assert any("could not be handled" in r.getMessage() and r.exc_info for r in caplog.records)
    assert [f.path for f in backend.collect(handle, tmp_path / "out").files] == ["f"]


@pytest.mark.harness_only("the RBAC denial of pods/log is injected (a real cluster would need a second user)")
def test_a_refused_pod_log_is_said_and_the_agents_report_decides(
        k8s_api: tuple[Target, Api], store: Store, caplog: pytest.LogCaptureFixture) -> None:
    cluster, api = k8s_api
    caplog.set_level(logging.WARNING, "keruta.kubernetes")
    cluster.deny("pods", "get", "log")
    # The agent holds its files until they are collected (an hour at most): wait() must not wait for that.
    backend = KubernetesBackend(settings_for(cluster, api, artifacts_hold_timeout=3600), store, tuning=fast())
    handle = backend.launch(store.create_task(Task.model_validate({"id": "d-nolog", "script": "true"})),
                            RunContext(attempt=1))
    notes: list[str] = []
    _waiter, outcome = in_thread(lambda: backend.wait(handle, lambda _level, text: notes.append(text)))
    eventually(lambda: outcome, what="wait() to return")
    assert isinstance(outcome[0], Outcome) and outcome[0].status == "COMPLETED", outcome
    assert [p["status"]["phase"] for p in cluster.pods(job=handle.name)] == ["Running"]  # still holding
    assert any("cannot be followed" in n and "grant `get` on `pods/log`" in n for n in notes), notes
    assert any(r.levelno == logging.ERROR and "HTTP 403" in r.getMessage() for r in caplog.records)
    backend.cancel(handle)


@pytest.mark.harness_only("injects 503s into the Pod log, written by a manual kubelet")
def test_server_errors_on_the_pod_log_are_said_and_survived(manual_cluster: Cluster, store: Store,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    cluster = manual_cluster
    caplog.set_level(logging.WARNING, "keruta.kubernetes")
    seen: list[str] = []
    _backend, _handle, pod, waiter, outcome = start_wait(cluster, store, "d-log5xx", fast(),
                                                         lambda _level, text: seen.append(text))
    cluster.log(pod, "first", "second")
    cluster.fail(3, 503, verb="get", resource="pods")
    cluster.run_pod(pod)
    cluster.wait_for(lambda: len(seen) >= 2, what="the lines after the errors")
    cluster.finish_pod(pod, 0)
    waiter.join(20)
    assert outcome and isinstance(outcome[0], Outcome) and outcome[0].status == "COMPLETED", outcome
    assert seen == ["first", "second"]
    [warning] = [r for r in caplog.records if "reading the log of Pod" in r.getMessage()]
    assert "HTTP 503" in warning.getMessage()  # once for the streak, not once per retry


# --- 9. cancellation -----------------------------------------------------------------------------------

@pytest.mark.harness_only("a finalizer nobody removes is put on the Pod by the harness")
def test_cancel_says_which_pods_are_left_when_they_do_not_go(manual_cluster: Cluster, store: Store,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    cluster = manual_cluster
    caplog.set_level(logging.WARNING, "keruta.kubernetes")
    backend = KubernetesBackend(settings_for(cluster), store, tuning=fast(cancel_wait=1))
    handle = backend.launch(store.create_task(Task(id="d-stuck")), RunContext(attempt=1))
    pod = cluster.wait_for_pod(handle.name)["metadata"]["name"]
    cluster.stick_pod(pod)
    canceller, answer = in_thread(lambda: backend.cancel(handle))
    canceller.join(15)
    assert answer, "cancel() did not return"
    assert isinstance(answer[0], str) and f"Job default/{handle.name} was deleted" in answer[0] and pod in answer[0]
    assert any(pod in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    cluster.unstick_pod(pod)
    assert backend.cancel(handle) is None  # nothing left


@pytest.mark.harness_only("the RBAC denial in one namespace is injected")
def test_jobs_of_a_flow_run_are_found_in_every_namespace_given(manual_cluster: Cluster, store: Store,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    cluster = manual_cluster
    caplog.set_level(logging.WARNING, "keruta.kubernetes")
    for namespace in ("team-a", "team-b", "team-c"):
        cluster.create_namespace(namespace)
    backend = KubernetesBackend(settings_for(cluster), store, tuning=fast())
    launched = {}
    for namespace in ("team-a", "team-c", "default"):
        task = store.create_task(Task.model_validate({"id": f"d-ns-{namespace}", "namespace": namespace}))
        launched[namespace] = backend.launch(task, RunContext(flow_run_id="fr-many", attempt=1)).name
    cluster.deny("jobs", "list", namespace="team-b")  # e.g. no Role there
    found = backend.attempts_of_flow_run("fr-many", ["team-a", "team-b", "team-c", "no-such-namespace", ""])
    assert {(h.namespace, h.name) for h in found} == {(ns, name) for ns, name in launched.items()}
    assert any("team-b" in r.getMessage() and "forbidden" in r.getMessage() for r in caplog.records)
    assert {h.task_id for h in backend.attempts_of_flow_run("fr-many", frozenset({"team-a"}))} == {
        "d-ns-team-a", "d-ns-default"}
    cluster.deny("jobs", "list")  # nowhere at all: that is an error worth raising
    with pytest.raises(BackendError, match="forbidden"):
        backend.attempts_of_flow_run("fr-many", set())


@pytest.mark.usefixtures("prefect_server")
def test_the_agents_last_lines_reach_the_flow_runs_prefect_log_whatever_the_process_settings(
        k8s_api: tuple[Target, Api], store: Store) -> None:
    """The follower goes on after wait() returned (the agent holds, then says it exits). Its lines belong to
    the caller's flow run on the caller's Prefect API, also when that API is set only in the caller's
    context (``temporary_settings``, a flow composed under other settings), not process-wide: a thread
    without the caller's context sent them elsewhere (here, to a dead address; in the benchmark, to an
    ephemeral server whose start blocked Prefect's event loop for 15 s, stalling the next flow)."""
    import prefect.context
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from keruta_prefect.blocks import seed
    from keruta_prefect.flows import keruta_task

    cluster, api = k8s_api
    block = f"ctx-{uuid.uuid4().hex[:8]}"
    seed(settings_for(cluster, api), name=block)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        elsewhere = prefect.context.get_settings_context()  # the process's settings: another API
    with prefect.context._temporary_global_settings_context(elsewhere):
        state = keruta_task(task_spec={"id": "ctx-run", "script": "echo hello"}, backend="kubernetes",
                            settings_block=block, return_state=True)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        def lines() -> list[str]:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            messages = [log.message for log in logs]
            return messages if "keruta-agent INFO artifacts collected; exiting" in messages else []

        messages = cluster.wait_for(lines, timeout=30, what="the agent's last line in the flow run's log")
    assert "hello" in messages
