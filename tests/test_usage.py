"""What each task used (issue 14 §2): the agent measures its script (cgroup v2 in its own container, else
rusage and its process tree in /proc), sends it with its final status, the API keeps it for the attempt's run
(even when the agent reports before the run is written), the local backend's memory limit, and the surfaces
(`run --json`, the summary and event, `tasks usage`)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from keruta_prefect.agent.usage import Measured, ScriptMeter, container_cgroup, tree
from keruta_prefect.contract import UsageSource
from keruta_prefect.models import Task, TaskStatus, Usage
from keruta_prefect.store import Store, TaskRunRow
from tests.conftest import Api, run_agent
from tests.targets import Target
from tests.waiting import eventually

MiB = 2**20
# Allocates about 200 MB and touches every page of it (so it is resident, not only reserved).
ALLOCATE_200MB = "b = bytearray(200*1024*1024); b[::4096] = b'x'*len(b[::4096])"
HOLD = "import sys, time\n" "b = bytearray({mib}*1024*1024); b[::4096] = b'x'*len(b[::4096])\n" "{then}"


def make(store: Store, task_id: str, script: str, **extra: object) -> None:
    store.create_task(Task.model_validate({"id": task_id, "script": script, **extra}))


# --- the agent's measurement ---------------------------------------------------------------------------------

def test_the_agents_usage_keys_are_the_fields_of_models_usage() -> None:
    """The keys are spelled once (contract.UsageKey); what the agent sends parses as Usage, every field set."""
    sent = Measured(cpu_seconds=1.25, peak_memory_bytes=3 * MiB, wall_seconds=2.5, log_bytes=10,
                    source=UsageSource.RUSAGE).as_report()
    usage = Usage.model_validate(sent)
    assert usage.model_fields_set == set(Usage.model_fields)
    assert (usage.cpu_seconds, usage.peak_memory_bytes, usage.wall_seconds, usage.log_bytes, usage.source) == (
        1.25, 3 * MiB, 2.5, 10, "rusage")
    assert usage.model_dump(by_alias=True) == sent


def _fake_cgroup(tmp_path: Path, *, self_cgroup: str = "0::/\n", members: list[int] | None = None,
                 usec: int = 5_000_000, peak: int | None = 64 * MiB) -> tuple[Path, Path]:
    """A cgroup v2 directory and a /proc with the agent (pid 1, a container's first process) in it."""
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    root.mkdir()
    (proc / "self").mkdir(parents=True)
    (proc / "1").mkdir()
    (proc / "self" / "cgroup").write_text(self_cgroup)
    (proc / "1" / "stat").write_text("1 (keruta agent) S 0 1 1 0 -1 4194560 " + "0 " * 14 + "100 0 0\n")
    (proc / "self" / "stat").write_text((proc / "1" / "stat").read_text())
    (root / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in (members or [1])))
    (root / "cpu.stat").write_text(f"usage_usec {usec}\nuser_usec {usec - 1000}\nsystem_usec 1000\n")
    if peak is not None:
        (root / "memory.peak").write_text(f"{peak}\n")
    return root, proc


def test_in_its_own_container_the_agent_reads_cgroup_v2(tmp_path: Path) -> None:
    root, proc = _fake_cgroup(tmp_path)
    assert container_cgroup(root, proc) == root
    meter = ScriptMeter(cgroup_root=root, proc=proc)
    meter.begin()
    assert meter.cgroup == root
    (root / "cpu.stat").write_text("usage_usec 7500000\nuser_usec 7000000\nsystem_usec 500000\n")  # +2.5 s
    (root / "memory.peak").write_text(f"{300 * MiB}\n")
    measured = meter.finish()
    assert (measured.source, measured.cpu_seconds, measured.peak_memory_bytes) == ("cgroup", 2.5, 300 * MiB)


@pytest.mark.parametrize("limit", [None, 100 * MiB])
def test_in_its_own_container_the_tree_is_sampled_only_to_enforce_a_limit(tmp_path: Path, limit: int | None) -> None:
    """memory.peak has the peak: with no limit to enforce the agent spends nothing on looking at /proc."""
    root, proc = _fake_cgroup(tmp_path)
    meter = ScriptMeter(limit, cgroup_root=root, proc=proc, interval=3600)
    meter.begin()
    meter.watch(1)  # the agent's fake stat file says 100 pages
    meter.finish()
    assert meter.sampled_peak == (0 if limit is None else 100 * os.sysconf("SC_PAGE_SIZE"))


@pytest.mark.parametrize(("case", "change"), [
    ("cgroup v1 or hybrid", {"self_cgroup": "4:memory:/a\n0::/\n"}),
    ("not the container's root", {"self_cgroup": "0::/user.slice/session-1.scope\n"}),
    ("other processes in it (a test runner, a shell)", {"members": [1, 4242]}),
    ("no memory.peak (a kernel before 5.19)", {"peak": None}),
])
def test_anywhere_else_it_measures_with_rusage(tmp_path: Path, case: str, change: dict[str, object]) -> None:
    root, proc = _fake_cgroup(tmp_path, **change)  # type: ignore[arg-type]
    assert container_cgroup(root, proc) is None, case
    meter = ScriptMeter(cgroup_root=root, proc=proc)
    meter.begin()
    assert meter.finish().source == "rusage"


def _wait_for_files(*paths: Path) -> None:
    eventually(lambda: all(p.exists() for p in paths), what=f"{[p.name for p in paths]} to appear")


def test_a_tree_of_processes_is_measured_as_a_tree(tmp_path: Path) -> None:
    """Two children holding 60 MB each at once: the peak is their sum (ru_maxrss alone says 60 MB)."""
    release = tmp_path / "release"
    children = []
    for n in (1, 2):
        ready = tmp_path / f"ready{n}"
        then = (f"open({str(ready)!r}, 'w').close()\n"
                f"while not __import__('os').path.exists({str(release)!r}): time.sleep(0.01)")
        children.append(f"{sys.executable} -c {_quote(HOLD.format(mib=60, then=then))} &")
    script = "\n".join([*children, "wait"])
    meter = ScriptMeter()
    meter.begin()
    proc = subprocess.Popen(["sh", "-c", script], process_group=0)
    meter.watch(proc.pid)
    _wait_for_files(tmp_path / "ready1", tmp_path / "ready2")
    meter.sample()  # both children hold their 60 MB now
    assert len(tree(proc.pid)) == 3  # the shell and its two children
    release.touch()
    assert proc.wait(timeout=60) == 0
    measured = meter.finish()
    assert measured.source == "rusage"
    assert measured.peak_memory_bytes >= 120 * MiB, measured
    assert measured.cpu_seconds > 0 and measured.wall_seconds > 0


def test_wall_time_ends_when_the_script_ends_not_when_a_child_lets_go_of_its_output(
        api: Api, store: Store, tmp_path: Path) -> None:
    """A script that leaves a child holding its output ends at once: its wall time is the script's, not
    the agent's wait for the pipes (DRAIN_SECONDS) before it ends the child."""
    from keruta_prefect.agent.execute import DRAIN_SECONDS

    make(store, "quick", "sleep 30 &\necho started")
    done = run_agent(api, "quick", tmp_path / "w")
    assert done.returncode == 0, done.stderr
    usage = Usage.model_validate(_task_usage(store, "quick"))
    assert usage.wall_seconds is not None and usage.wall_seconds < DRAIN_SECONDS, usage
    assert usage.peak_memory_bytes != 0, usage  # a peak not seen is unknown (None), never "used nothing"


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def test_the_agent_reports_cpu_peak_wall_and_output_with_its_final_status(
        api: Api, store: Store, tmp_path: Path) -> None:
    make(store, "measured", f"echo hello\necho oops >&2\n{sys.executable} -c {_quote(ALLOCATE_200MB)}")
    done = run_agent(api, "measured", tmp_path / "w")
    assert done.returncode == 0, done.stderr
    task_row_usage = _task_usage(store, "measured")
    assert task_row_usage is not None
    usage = Usage.model_validate(task_row_usage)
    assert usage.peak_memory_bytes is not None and usage.peak_memory_bytes >= 200 * MiB
    assert usage.cpu_seconds is not None and usage.cpu_seconds > 0
    assert usage.wall_seconds is not None and usage.wall_seconds > 0
    assert (usage.log_bytes, usage.source) == (len(b"hello\noops\n"), "rusage")


def _task_usage(store: Store, task_id: str) -> dict[str, object] | None:
    from keruta_prefect.store import TaskRow

    with store.session(read=True) as s:
        row = s.get(TaskRow, task_id)
        assert row is not None
        return row.usage


# --- the local memory limit ------------------------------------------------------------------------------------

def test_over_its_memory_limit_the_script_tree_is_killed_and_reported_oomkilled(
        api: Api, store: Store, tmp_path: Path) -> None:
    """The agent enforces KERUTA_MEMORY_LIMIT as a cgroup would: the whole tree is killed (SIGKILL)."""
    pidfile = tmp_path / "grandchild.pid"
    hold = (f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
            "b = bytearray(200*1024*1024); b[::4096] = b'x'*len(b[::4096])\ntime.sleep(600)")
    make(store, "oom", f"echo starting\n{sys.executable} -c {_quote(hold)}\necho never")
    done = run_agent(api, "oom", tmp_path / "w", env={"KERUTA_MEMORY_LIMIT": str(100 * MiB)}, timeout=120)
    assert done.returncode == 1, done.stderr
    task = store.get_task("oom")
    assert (task.status, task.error_code) == ("FAILED", "OOMKilled")
    assert task.message is not None and "memory limit of 100.0 MiB (104857600 bytes)" in task.message
    peak = Usage.model_validate(_task_usage(store, "oom")).peak_memory_bytes
    assert peak is not None and peak > 100 * MiB and f"({peak} bytes) and was killed" in task.message
    messages = [row.message for row in store.logs("oom")]
    assert messages[0] == "starting" and "never" not in messages and messages[-1] == task.message
    grandchild = int(pidfile.read_text())  # the python under the shell was killed too
    eventually(lambda: _dead(grandchild), what=f"process {grandchild} to be killed")


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever inherited it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def test_a_script_that_went_over_the_limit_between_two_samples_is_oomkilled_too(
        api: Api, store: Store, tmp_path: Path) -> None:
    """It ended before a sample caught it; a cgroup would have killed it, so it is OOMKilled all the same."""
    make(store, "quick-oom", f"{sys.executable} -c {_quote(ALLOCATE_200MB)}")
    done = run_agent(api, "quick-oom", tmp_path / "w", env={"KERUTA_MEMORY_LIMIT": str(100 * MiB)})
    assert done.returncode == 1, done.stderr
    task = store.get_task("quick-oom")  # (a sample may have caught it while it allocated: killed, then)
    assert task.error_code == "OOMKilled" and "script went over its memory limit of 100.0 MiB" in (task.message or "")


def test_a_peak_no_sample_saw_still_counts_against_the_limit(tmp_path: Path) -> None:
    """The script allocates after the only sample (the first, at its start) and ends: ru_maxrss says it went
    over, so it is over the limit although it was never killed. (In a fresh interpreter, as the agent is: the
    test runner's own memory would hide a child's ru_maxrss.)"""
    gate = tmp_path / "go"
    wait_then_allocate = (f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
                          f"{ALLOCATE_200MB}")
    measure = f"""
import pathlib, subprocess, sys
from keruta_prefect.agent.usage import ScriptMeter
meter = ScriptMeter({100 * MiB}, interval=3600)  # no sample after the first
meter.begin()
proc = subprocess.Popen([sys.executable, "-c", {wait_then_allocate!r}], process_group=0)
meter.watch(proc.pid)
pathlib.Path({str(gate)!r}).touch()
assert proc.wait(timeout=60) == 0
measured = meter.finish()
import resource
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(meter.sampled_peak, measured.peak_memory_bytes, meter.killed, meter.over_limit, own)
"""
    # Started, as the agent is, by a process holding much more memory (a flow process): Linux starts the
    # measuring process' own ru_maxrss at that, which must not hide what its script used.
    big_parent = (f"import os, sys\nb = bytearray(300*1024*1024); b[::4096] = b'x'*len(b[::4096])\n"
                  f"os.execv(sys.executable, [sys.executable, '-c', {measure!r}])")
    done = subprocess.run([sys.executable, "-c", big_parent], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    sampled, peak, killed, over, own = done.stdout.split()
    assert int(own) >= 300 * MiB  # the inherited high-water mark is there…
    assert int(sampled) < 100 * MiB and int(peak) >= 200 * MiB  # …and the script's peak is seen above it
    assert (killed, over) == ("False", "True")


def test_a_small_script_under_a_limit_below_the_agents_own_memory_completes(
        api: Api, store: Store, tmp_path: Path) -> None:
    """Linux starts a child's ru_maxrss at its parent's memory (the agent's, some tens of MB): that is not
    the script's, and never makes it OOMKilled."""
    make(store, "small", "echo small")
    done = run_agent(api, "small", tmp_path / "w", env={"KERUTA_MEMORY_LIMIT": str(16 * MiB)})
    assert done.returncode == 0, done.stderr
    peak = Usage.model_validate(_task_usage(store, "small")).peak_memory_bytes
    assert store.get_task("small").status == "COMPLETED" and (peak is None or 0 < peak < 16 * MiB), peak


def test_a_bad_memory_limit_is_one_line_and_exit_2(api: Api, store: Store, tmp_path: Path) -> None:
    make(store, "bad-limit", "echo hi")
    done = run_agent(api, "bad-limit", tmp_path / "w", env={"KERUTA_MEMORY_LIMIT": "256Mi"})
    assert done.returncode == 2
    assert done.stderr.strip() == ("keruta-agent: KERUTA_MEMORY_LIMIT='256Mi': expected a whole number of bytes "
                                   "greater than zero")


# --- the API keeps it for the attempt's run ---------------------------------------------------------------------

def _put_status(api: Api, task_id: str, body: dict[str, object]) -> httpx.Response:
    return httpx.put(f"{api.url}/api/v1/tasks/{task_id}/status", json=body, headers=api.headers)


GOOD = {"cpuSeconds": 1.5, "peakMemoryBytes": 123456, "wallSeconds": 2.0, "logBytes": 7, "source": "rusage",
        "measuredByANewerAgent": 1}


def test_an_agent_that_reports_before_its_run_is_written_has_its_usage_on_that_run(
        api: Api, store: Store) -> None:
    """The fast-task race: the flow writes the run when the backend's launch returns, the agent may have
    reported by then. The usage waits on the task and the run takes it when it is finished."""
    make(store, "fast", "true")
    assert _put_status(api, "fast", {"status": "IN_PROGRESS"}).status_code == 200
    answer = _put_status(api, "fast", {"status": "COMPLETED", "message": "done", "usage": GOOD})
    assert answer.status_code == 200 and "usage" not in answer.json()  # not part of the task's JSON
    run = store.start_run(TaskRunRow(task_id="fast", attempt=1))  # only now: the launch returned
    assert run.id is not None and run.usage is None
    store.update_run(run.id, status="COMPLETED", finished_at=datetime.now(UTC))
    [finished] = store.runs("fast")
    expected = {k: v for k, v in GOOD.items() if k != "measuredByANewerAgent"}
    assert finished.usage == expected
    assert _task_usage(store, "fast") is None  # moved, not copied


def test_an_attempt_starts_without_the_usage_an_earlier_agent_left_on_the_task(api: Api, store: Store) -> None:
    make(store, "again", "true")
    _put_status(api, "again", {"status": "IN_PROGRESS"})
    _put_status(api, "again", {"status": "FAILED", "usage": GOOD})  # no run took it (its flow died)
    assert _task_usage(store, "again") is not None
    store.set_status("again", TaskStatus.RETRYING)
    assert _task_usage(store, "again") is None
    _put_status(api, "again", {"status": "IN_PROGRESS"})
    run = store.start_run(TaskRunRow(task_id="again", attempt=2))
    assert run.id is not None
    _put_status(api, "again", {"status": "FAILED"})  # this agent measured nothing (an older agent)
    assert store.update_run(run.id, finished_at=datetime.now(UTC)).usage is None


@pytest.mark.parametrize("bad", ["a lot", [1, 2], {"cpuSeconds": -1}, {"peakMemoryBytes": "big"},
                                 {"source": "x" * 100}, {"peakMemoryBytes": 10**400}, {"wallSeconds": 1e300}])
def test_a_bad_usage_never_fails_the_final_status_it_is_ignored_and_logged(
        api: Api, store: Store, bad: object, caplog: pytest.LogCaptureFixture) -> None:
    make(store, "odd", "true")
    _put_status(api, "odd", {"status": "IN_PROGRESS"})
    with caplog.at_level(logging.WARNING, logger="keruta.api"):
        answer = _put_status(api, "odd", {"status": "COMPLETED", "usage": bad})
    assert answer.status_code == 200, answer.text
    assert store.get_task("odd").status == "COMPLETED" and _task_usage(store, "odd") is None
    assert any("task odd: usage=" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


def test_infinity_is_no_usage(api: Api, store: Store) -> None:
    """Python's JSON reads Infinity; a JSON column (PostgreSQL's) cannot hold it: refused as a bad usage."""
    make(store, "inf", "true")
    _put_status(api, "inf", {"status": "IN_PROGRESS"})
    answer = httpx.put(f"{api.url}/api/v1/tasks/inf/status",
                       headers={**api.headers, "Content-Type": "application/json"},
                       content=b'{"status": "FAILED", "usage": {"cpuSeconds": Infinity}}')
    assert answer.status_code == 200 and _task_usage(store, "inf") is None


def test_a_refused_status_keeps_no_usage(api: Api, store: Store) -> None:
    make(store, "done", "true")
    _put_status(api, "done", {"status": "IN_PROGRESS"})
    _put_status(api, "done", {"status": "COMPLETED", "usage": GOOD})
    run = store.start_run(TaskRunRow(task_id="done", attempt=1))
    assert run.id is not None
    store.update_run(run.id, finished_at=datetime.now(UTC))
    late = _put_status(api, "done", {"status": "FAILED", "usage": {**GOOD, "cpuSeconds": 99.0}})
    assert late.status_code == 409 and _task_usage(store, "done") is None
    assert store.runs("done")[0].usage is not None and store.runs("done")[0].usage["cpuSeconds"] == 1.5


# --- through the flow: `run --json`, the summary and the event, the local memory limit -------------------------

@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """The `keruta.task.*` events the summary emits (still emitted to Prefect)."""
    import keruta_prefect.summary as summary

    seen: list[dict[str, object]] = []
    original = summary.emit_event

    def recording(**kwargs: object) -> object:
        seen.append(kwargs)
        return original(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(summary, "emit_event", recording)
    return seen


@pytest.mark.usefixtures("prefect_server")
def test_cli_run_json_of_a_task_that_allocates_200mb_reports_its_usage(
        store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str], events: list[dict[str, object]]) -> None:
    from keruta_prefect.cli import main
    from tests.test_flow_local import markdown_artifact

    spec = tmp_path / "big.json"
    script = f"echo allocating\npython3 -c {_quote(ALLOCATE_200MB)}"
    spec.write_text(json.dumps({"id": "cli-200mb", "script": script}))
    assert main(["run", "--task-file", str(spec), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "COMPLETED"
    assert result["usage"]["peak_memory_bytes"] >= 200 * MiB, result["usage"]
    assert result["usage"]["cpu_seconds"] > 0 and result["usage"]["wall_seconds"] > 0
    assert result["usage"]["source"] == "rusage" and result["usage"]["log_bytes"] == len(b"allocating\n")
    [run] = store.runs("cli-200mb")
    assert Usage.model_validate(run.usage).peak_memory_bytes == result["usage"]["peak_memory_bytes"]
    summary = markdown_artifact("keruta-cli-200mb")
    assert "| peak memory | " in summary and "— no request or limit |" in summary and "| CPU used | " in summary
    [event] = events
    payload = event["payload"]
    assert isinstance(payload, dict)
    assert payload["usage"] == result["usage"] and payload["resources"] is None


@pytest.mark.usefixtures("prefect_server")
def test_a_local_task_over_its_memory_limit_is_oomkilled_with_what_it_used_and_asked_for(
        store: Store, events: list[dict[str, object]]) -> None:
    from keruta_prefect.blocks import seed
    from keruta_prefect.flows import KerutaTaskFailed, keruta_task
    from keruta_prefect.settings import KerutaSettings
    from tests.test_flow_local import markdown_artifact

    block = "usage-no-oom-retry"  # one attempt: what it used and asked for, not the retry (tests/test_retries.py)
    seed(KerutaSettings(task_retry_oom_memory_factor="off"), name=block)
    script = f"python3 -c {_quote(HOLD.format(mib=200, then='time.sleep(600)'))}"
    state = keruta_task(task_spec={"id": "local-oom", "script": script,
                                   "resources": {"memoryRequest": "64Mi", "memoryLimit": "100Mi"}},
                        settings_block=block, return_state=True)
    with pytest.raises(KerutaTaskFailed) as info:
        state.result()
    result = info.value.result
    assert (result.status, result.reason, result.exit_code) == ("FAILED", "OOMKilled", 1)
    assert "memory limit of 100.0 MiB" in (result.message or "")
    assert result.resources is not None and result.resources.memory_limit == "100Mi"
    assert result.usage is not None and (result.usage.peak_memory_bytes or 0) > 100 * MiB
    [run] = store.runs("local-oom")
    assert run.resources == {"memoryRequest": "64Mi", "memoryLimit": "100Mi"} and run.reason == "OOMKilled"
    summary = markdown_artifact("keruta-local-oom")
    assert "— request 64Mi (" in summary and ", limit 100Mi (" in summary
    [event] = events
    assert event["event"] == "keruta.task.failed"
    payload = event["payload"]
    assert isinstance(payload, dict)
    assert payload["resources"] == {"memory_request": "64Mi", "memory_limit": "100Mi"}
    assert payload["usage"]["peak_memory_bytes"] == result.usage.peak_memory_bytes  # type: ignore[index]


def test_summary_rows_say_used_against_requested() -> None:
    from keruta_prefect.models import Resources, TaskResult
    from keruta_prefect.summary import usage_rows

    result = TaskResult(task_id="t", status=TaskStatus.COMPLETED, attempt=1, backend="kubernetes",
                        resources=Resources(cpu_request="500m", cpu_limit="2", memory_request="256Mi",
                                            memory_limit="1Gi"),
                        usage=Usage(cpu_seconds=4.0, peak_memory_bytes=128 * MiB, wall_seconds=10.0, log_bytes=42,
                                    source="cgroup"))
    assert usage_rows(result) == [
        "| CPU used | 4.00s, 0.40 cores on average — request 500m (80 %), limit 2 (20 %) |",
        "| peak memory | 128.0 MiB — request 256Mi (50 %), limit 1Gi (12 %) |",
        "| wall time | 10.0s |",
        "| output | 42 bytes |",
        "| measured by | cgroup |",
    ]
    assert usage_rows(result.model_copy(update={"usage": None})) == [
        "| used | not measured (the agent reported no usage) |"]


# --- `keruta-prefect tasks usage` -------------------------------------------------------------------------------

def _ran(store: Store, task_id: str, *, peak: int | None, resources: dict[str, str] | None,
         ended: datetime, attempt: int = 1) -> None:
    if attempt == 1:
        make(store, task_id, "true")
    run = store.start_run(TaskRunRow(task_id=task_id, attempt=attempt, status="COMPLETED", resources=resources))
    assert run.id is not None
    usage = None if peak is None else {"cpuSeconds": 1.5, "peakMemoryBytes": peak, "wallSeconds": 3.0,
                                       "source": "rusage"}
    store.update_run(run.id, finished_at=ended, usage=usage)


def test_tasks_usage_lists_each_tasks_last_run_and_flags_what_does_not_fit(
        store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    from keruta_prefect.cli import main

    now = datetime.now(UTC)
    _ran(store, "wasteful", peak=10 * MiB, resources={"memoryRequest": "256Mi", "memoryLimit": "1Gi"},
         ended=now - timedelta(minutes=5))
    _ran(store, "tight", peak=250 * MiB, resources={"memoryRequest": "128Mi", "memoryLimit": "256Mi"},
         ended=now - timedelta(minutes=4))
    _ran(store, "fits", peak=200 * MiB, resources={"memoryRequest": "256Mi", "memoryLimit": "1Gi"},
         ended=now - timedelta(minutes=3))
    _ran(store, "only-limit", peak=20 * MiB, resources={"memoryLimit": "100Mi"}, ended=now - timedelta(minutes=2))
    _ran(store, "unmeasured", peak=None, resources=None, ended=now - timedelta(minutes=1))
    _ran(store, "old", peak=10 * MiB, resources={"memoryRequest": "1Gi"}, ended=now - timedelta(days=3))
    _ran(store, "fits", peak=900 * MiB, resources={"memoryRequest": "512Mi", "memoryLimit": "1Gi"},
         ended=now, attempt=2)  # its last run is the one shown

    assert main(["tasks", "usage", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["task_id"], r["attempt"], r["flag"]) for r in rows] == [
        ("fits", 2, None), ("unmeasured", 1, None), ("only-limit", 1, "LOW"), ("tight", 1, "HIGH"),
        ("wasteful", 1, "LOW"), ("old", 1, "LOW")]
    assert rows[0]["usage"] == {"cpu_seconds": 1.5, "peak_memory_bytes": 900 * MiB, "wall_seconds": 3.0,
                                "source": "rusage"}
    assert rows[0]["resources"] == {"memory_request": "512Mi", "memory_limit": "1Gi"}
    assert rows[1]["usage"] is None

    assert main(["tasks", "usage", "--since", "1h"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["TASK", "STATUS", "ATTEMPT", "CPU_S", "WALL_S", "PEAK_MIB", "MEM_REQUEST",
                                    "MEM_LIMIT", "FLAG"]
    assert [line.split("\t")[0] for line in lines[1:]] == ["fits", "unmeasured", "only-limit", "tight", "wasteful"]
    assert lines[4].split("\t") == ["tight", "COMPLETED", "1", "1.50", "3.0", "250.0", "128Mi", "256Mi", "HIGH"]
    assert lines[2].split("\t")[3:] == ["-", "-", "-", "-", "-", "-"]

    since = (now - timedelta(minutes=3, seconds=30)).isoformat()
    assert main(["tasks", "usage", "--since", since, "--json"]) == 0
    assert [r["task_id"] for r in json.loads(capsys.readouterr().out)] == ["fits", "unmeasured", "only-limit"]


@pytest.mark.parametrize("since", ["yesterday", "5 minutes", "-1h", "2026-13-01", ""])
def test_tasks_usage_with_a_bad_since_is_one_line_and_exit_2(
        store: Store, capsys: pytest.CaptureFixture[str], since: str) -> None:
    from keruta_prefect.cli import main

    assert main(["tasks", "usage", f"--since={since}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"keruta-prefect: --since={since!r}: expected a duration (90s, 30m, 12h, 7d, 2w) or an ISO date "
                   "or date-time (2026-01-31, 2026-01-31T12:00:00Z)\n")


def test_tasks_usage_help_says_what_the_flags_compare_to(capsys: pytest.CaptureFixture[str]) -> None:
    from keruta_prefect.cli import main

    with pytest.raises(SystemExit):
        main(["tasks", "usage", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "LOW when the peak is under 25% of the memory request (of the limit if it has no request)" in text
    assert "HIGH when the peak is over 90% of the memory limit (of the request if it has no limit)" in text


# --- on the Kubernetes harness (the kubelet runs the agent as a local process: the rusage path) -----------------

@pytest.mark.usefixtures("prefect_server")
def test_on_kubernetes_a_task_that_allocates_200mb_reports_its_usage_and_the_resources_it_ran_with(
        cluster: Target, api: Api, store: Store, events: list[dict[str, object]]) -> None:
    from keruta_prefect.blocks import seed
    from keruta_prefect.flows import keruta_task

    cluster.create_secret("keruta-api-token", {"token": api.token})
    block = f"k8s-usage-{os.getpid()}"
    seed(cluster.settings(api_url=api.url, artifacts_mode="off"), name=block)
    script = f"echo allocating\npython3 -c {_quote(ALLOCATE_200MB)}"
    result = keruta_task(task_spec={"id": "k-200mb", "script": script, "resources": {"memoryLimit": "512Mi"}},
                         backend="kubernetes", settings_block=block)
    assert (result.status, result.backend) == ("COMPLETED", "kubernetes")
    assert result.usage is not None and (result.usage.peak_memory_bytes or 0) >= 200 * MiB, result.usage
    assert (result.usage.cpu_seconds or 0) > 0
    # The requests and limits the Job's container got: the task's limit, the settings' defaults for the rest.
    assert result.resources is not None
    assert (result.resources.memory_limit, result.resources.memory_request) == ("512Mi", "128Mi")
    [run] = store.runs("k-200mb")
    assert run.usage is not None and run.resources is not None and run.resources["memoryLimit"] == "512Mi"
    [event] = events
    assert event["payload"]["usage"]["peak_memory_bytes"] == result.usage.peak_memory_bytes  # type: ignore[index]
