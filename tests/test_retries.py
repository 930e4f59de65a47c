"""Retry by failure class: the policy (keruta_prefect.retries.decide, pure, table-tested), its settings, and the
flow applying it on the harness cluster and the local backend (an OOM retry that completes with more memory)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from keruta_prefect.blocks import seed
from keruta_prefect.contract import TaskStatus
from keruta_prefect.flows import RETRY_LOG_SOURCE, KerutaTaskFailed, keruta_task
from keruta_prefect.manifest import job_name
from keruta_prefect.models import Resources, TaskResult
from keruta_prefect.retries import Action, Ended, decide, format_memory, memory_bytes, scale_memory
from keruta_prefect.settings import KerutaSettings, SettingsError, settings_from_mapping
from keruta_prefect.store import Store
from tests.conftest import Api
from tests.targets import Target
from tests.test_flow_local import markdown_artifact

F = TaskStatus.FAILED


def mem(limit: str | None = None, request: str | None = None) -> Resources:
    return Resources(memory_limit=limit, memory_request=request)


DEFAULTS = KerutaSettings()

# (what ended, settings changed, action, next attempt's memory (limit, request), next timeout, the line)
TABLE = [
    pytest.param(Ended(status=F, reason="OOMKilled", resources=mem("256Mi")), {}, Action.RETRY_CHANGED,
                 ("512Mi", None), None, "attempt 1 OOMKilled at 256Mi → attempt 2 with 512Mi", id="oom-doubles"),
    pytest.param(Ended(status=F, reason="OOMKilled", resources=mem("256Mi", "128Mi")), {}, Action.RETRY_CHANGED,
                 ("512Mi", "256Mi"), None,
                 "attempt 1 OOMKilled at 256Mi → attempt 2 with 512Mi (request 128Mi → 256Mi)", id="oom-request-too"),
    pytest.param(Ended(status=F, reason="OOMKilled", resources=mem("1Gi", "1Gi")),
                 {"task_retry_oom_memory_factor": "1.5"}, Action.RETRY_CHANGED, ("1536Mi", "1536Mi"), None,
                 "attempt 1 OOMKilled at 1Gi → attempt 2 with 1536Mi", id="oom-factor-1.5-request-equal-limit"),
    pytest.param(Ended(status=F, reason="OOMKilled", resources=mem("500M")), {}, Action.RETRY_CHANGED,
                 ("1G", None), None, "attempt 1 OOMKilled at 500M → attempt 2 with 1G", id="oom-decimal-units"),
    pytest.param(Ended(status=F, reason="OOMKilled", attempt=2, used=2, resources=mem("6Gi", "6Gi")), {},
                 Action.RETRY_CHANGED, ("8Gi", "8Gi"), None,
                 "attempt 2 OOMKilled at 6Gi → attempt 3 with 8Gi (capped by keruta.task.retry.max-memory=8Gi)",
                 id="oom-capped-request-above-limit-after-scaling"),
    pytest.param(Ended(status=F, reason="OOMKilled", attempt=2, used=2, resources=mem("6Gi", "5Gi")), {},
                 Action.RETRY_CHANGED, ("8Gi", "8Gi"), None,
                 "attempt 2 OOMKilled at 6Gi → attempt 3 with 8Gi (capped by keruta.task.retry.max-memory=8Gi; "
                 "request 5Gi → 8Gi)", id="oom-scaled-request-never-above-the-limit"),
    pytest.param(Ended(status=F, reason="OOMKilled", attempt=3, used=1, resources=mem("8Gi", "6Gi")), {},
                 Action.END, None, None,
                 "attempt 3 OOMKilled at 8Gi: not retried, the cap keruta.task.retry.max-memory=8Gi was reached",
                 id="oom-at-the-cap-fails"),
    pytest.param(Ended(status=F, reason="OOMKilled", resources=mem("16Gi")), {}, Action.END, None, None,
                 "attempt 1 OOMKilled at 16Gi: not retried, the cap keruta.task.retry.max-memory=8Gi was reached",
                 id="oom-above-the-cap-is-never-lowered"),
    pytest.param(Ended(status=F, reason="OOMKilled", resources=mem("256Mi")),
                 {"task_retry_oom_memory_factor": "off"}, Action.END, None, None,
                 "attempt 1 OOMKilled at 256Mi: not retried (keruta.task.retry.oom-memory-factor=off)", id="oom-off"),
    pytest.param(Ended(status=F, reason="OOMKilled", resources=mem(None, "128Mi")), {}, Action.RETRY, None, None,
                 "attempt 1 OOMKilled without a memory limit (the node ran out of memory) → attempt 2 unchanged",
                 id="oom-without-a-limit-is-node-pressure"),
    pytest.param(Ended(status=F, reason="OOMKilled", used=3, resources=mem("256Mi")), {}, Action.END, None, None,
                 "attempt 1 OOMKilled at 256Mi: not retried, keruta.task.max-attempts=3 used up",
                 id="oom-attempts-used-up"),
    pytest.param(Ended(status=F, reason="Evicted"), {}, Action.RETRY, None, None,
                 "attempt 1 Evicted → attempt 2 unchanged", id="eviction"),
    pytest.param(Ended(status=F, reason="PreemptionByScheduler", resources=mem("256Mi")), {}, Action.RETRY, None,
                 None, "attempt 1 PreemptionByScheduler → attempt 2 unchanged", id="preemption"),
    pytest.param(Ended(status=F, reason="AGENT_KILLED", retryable=True), {}, Action.RETRY, None, None,
                 "attempt 1 AGENT_KILLED → attempt 2 unchanged", id="system-failure"),
    pytest.param(Ended(status=F, reason="LOST", retryable=True, used=3), {"task_max_attempts": 3}, Action.END,
                 None, None, "attempt 1 LOST: not retried, keruta.task.max-attempts=3 used up", id="lost-used-up"),
    pytest.param(Ended(status=F, reason="SCRIPT_EXIT_3"), {}, Action.END, None, None, None, id="script-exit"),
    pytest.param(Ended(status=F, reason="ImagePullBackOff"), {}, Action.END, None, None, None, id="image-pull"),
    pytest.param(Ended(status=F, reason="AGENT_CONFIG_ERROR"), {}, Action.END, None, None, None, id="config"),
    pytest.param(Ended(status=F, reason="TIMEOUT", timeout_seconds=60), {}, Action.END, None, None, None,
                 id="deadline-off-by-default"),
    pytest.param(Ended(status=F, reason="TIMEOUT", timeout_seconds=60), {"task_retry_deadline_factor": "2"},
                 Action.RETRY_CHANGED, None, 120, "attempt 1 TIMEOUT after 60s → attempt 2 with a timeout of 120s",
                 id="timeout-retried-longer"),
    pytest.param(Ended(status=F, reason="DeadlineExceeded", timeout_seconds=45), {"task_retry_deadline_factor": "1.5"},
                 Action.RETRY_CHANGED, None, 68,
                 "attempt 1 DeadlineExceeded after 45s → attempt 2 with a timeout of 68s", id="job-deadline-rounds-up"),
    pytest.param(Ended(status=TaskStatus.COMPLETED), {}, Action.END, None, None, None, id="completed"),
    pytest.param(Ended(status=TaskStatus.CANCELLED, reason="TERMINATED"), {}, Action.END, None, None, None,
                 id="cancelled"),
]


@pytest.mark.parametrize(("ended", "changes", "action", "memory", "timeout", "line"), TABLE)
def test_the_retry_policy_by_failure_class(ended: Ended, changes: dict[str, object], action: Action,
                                           memory: tuple[str | None, str | None] | None, timeout: int | None,
                                           line: str | None) -> None:
    settings = KerutaSettings(**changes) if changes else DEFAULTS
    decision = decide(ended, settings)
    assert (decision.action, decision.line) == (action, line)
    got = decision.resources
    assert ((got.memory_limit, got.memory_request) if got else None) == memory
    assert decision.timeout_seconds == timeout
    assert decision.retry == (action != Action.END)
    if got is not None and got.memory_request is not None:
        assert memory_bytes(got.memory_request) <= memory_bytes(got.memory_limit or "0")


def test_the_pause_before_a_new_attempt_is_the_one_backoff_and_none_for_a_lost_agent() -> None:
    assert decide(Ended(status=F, reason="AGENT_KILLED", retryable=True, used=1), DEFAULTS).delay == 2
    assert decide(Ended(status=F, reason="AGENT_KILLED", retryable=True, used=2), DEFAULTS).delay == 4
    assert decide(Ended(status=F, reason="LOST", retryable=True, used=1), DEFAULTS).delay == 0


@pytest.mark.parametrize(("quantity", "factor", "expected"), [
    ("256Mi", 2, "512Mi"), ("1Gi", 2, "2Gi"), ("1Gi", 1.5, "1536Mi"), ("256Mi", 1.3, "333Mi"), ("500M", 2, "1G"),
    ("1.5Gi", 2, "3Gi"), ("1000", 1.5, "1500"), ("100Ki", 3, "300Ki"), ("0.5Gi", 2, "1Gi"), ("268435456", 2, "512Mi"),
])
def test_memory_quantities_scale_exactly_in_their_own_units(quantity: str, factor: float, expected: str) -> None:
    assert scale_memory(quantity, factor) == expected


def test_memory_quantities_parse_and_format_exactly() -> None:
    assert memory_bytes("256Mi") == 256 * 2**20 and memory_bytes("1.5G") == 1_500_000_000
    assert memory_bytes("500m") * 2 == 1
    # every form Kubernetes accepts: a decimal exponent (its docs' own 129e6), a leading +, a trailing dot
    assert [memory_bytes(q) for q in ("129e6", "1E3", "+1Gi", "1.", "2.5E+2")] == [129 * 10**6, 1000, 2**30, 1, 250]
    assert memory_bytes("1E") == 10**18  # E alone is exa
    assert scale_memory("129e6", 2) == "247Mi"  # 258e6 bytes, rounded up to a whole Mi
    assert format_memory(3 * 2**30) == "3Gi" and format_memory(2**20 + 1) == str(2**20 + 1)
    assert format_memory(2 * 10**9, decimal=True) == "2G"
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        memory_bytes("lots")


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("keruta.task.retry.oom-memory-factor", "1", "keruta.task.retry.oom-memory-factor='1': expected a factor "
                                                 "greater than 1 (at most 100), such as 2 or 1.5, or off"),
    ("keruta.task.retry.oom-memory-factor", "double", "keruta.task.retry.oom-memory-factor='double': expected a "
                                                      "factor greater than 1"),
    ("keruta.task.retry.deadline-factor", "-2", "keruta.task.retry.deadline-factor='-2': expected a factor"),
    ("keruta.task.retry.max-memory", "lots", "keruta.task.retry.max-memory='lots': expected a Kubernetes quantity"),
    ("keruta.task.retry.max-memory", "0", "keruta.task.retry.max-memory='0': must be greater than zero"),
])
def test_bad_retry_settings_are_one_line_naming_the_key_and_the_value(key: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings_from_mapping({key: value})
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_retry_settings_read_off_and_numbers() -> None:
    settings = settings_from_mapping({"keruta.task.retry.oom-memory-factor": "OFF",
                                      "keruta.task.retry.deadline-factor": "1.5",
                                      "keruta.task.retry.max-memory": "4Gi"})
    assert (settings.task_retry_oom_memory_factor, settings.task_retry_deadline_factor,
            settings.task_retry_max_memory) == ("off", 1.5, "4Gi")
    assert (DEFAULTS.task_retry_oom_memory_factor, DEFAULTS.task_retry_deadline_factor) == (2, "off")


# --- the flow applies it: an OOM retry that completes, an eviction after it, a deadline retry --------------

# A script of ~300 MB, every page written (bytes * n fills them). The first attempt (no first marker yet) holds
# its memory until it is killed; with a second marker, the next attempt kills its agent (a system failure);
# every later one ends at once. 256Mi cannot hold it, 512Mi can (its agent included).
ALLOCATES_300_MB = """\
import os, pathlib, threading
markers = [pathlib.Path(path) for path in {markers!r}]
phase = next((index for index, marker in enumerate(markers) if not marker.exists()), len(markers))
if phase < len(markers):
    markers[phase].touch()  # before allocating: the limit may end it while it allocates
data = b"x" * (300 * 2**20)
print("holding", len(data) // 2**20, "MB", flush=True)
if phase == 0:
    threading.Event().wait()  # held until the memory limit ends it
if phase == 1 < len(markers):
    os.kill(os.getppid(), 9)  # the agent is killed: a system failure
print("done", flush=True)
"""


def oom_task(task_id: str, *markers: Path, **extra: object) -> dict[str, object]:
    return {"id": task_id, "resources": {"memoryLimit": "256Mi"},
            "script": {"content": ALLOCATES_300_MB.format(markers=[str(m) for m in markers]), "language": "python",
                       "filename": "allocate.py"}, **extra}


def retry_lines(store: Store, task_id: str) -> list[str]:
    return [row.message for row in store.logs(task_id) if row.source == RETRY_LOG_SOURCE]


def result_of(state: Any) -> TaskResult:
    try:
        return state.result()  # type: ignore[no-any-return]
    except KerutaTaskFailed as exc:
        return exc.result


@pytest.mark.harness_only("the harness kubelet enforces the memory limit on local processes; the marker file is on "
                          "this machine")
@pytest.mark.usefixtures("prefect_server")
def test_an_oom_killed_attempt_is_retried_with_twice_the_memory_and_completes_on_the_cluster(
        cluster: Target, api: Api, store: Store, tmp_path: Path) -> None:
    cluster.create_secret("keruta-api-token", {"token": api.token})
    block = f"retry-{uuid.uuid4().hex[:8]}"
    seed(cluster.settings(api_url=api.url, artifacts_mode="off"), name=block)
    state = keruta_task(task_spec=oom_task("k-oom-retry", tmp_path / "first"), backend="kubernetes",
                        settings_block=block, return_state=True)
    result = result_of(state)
    assert (result.status, result.attempt) == ("COMPLETED", 2), result
    first, second = store.runs("k-oom-retry")
    assert (first.status, first.reason, first.exit_code) == ("FAILED", "OOMKilled", 137)
    assert first.resources == {"cpuRequest": "100m", "memoryRequest": "128Mi", "memoryLimit": "256Mi"}
    assert second.resources == {"cpuRequest": "100m", "memoryRequest": "256Mi", "memoryLimit": "512Mi"}
    assert result.resources is not None and result.resources.memory_limit == "512Mi"
    [job] = [j for j in cluster.jobs() if j["metadata"]["name"] == job_name("k-oom-retry", 2)]
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert limits == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    assert retry_lines(store, "k-oom-retry") == [
        "attempt 1 OOMKilled at 256Mi → attempt 2 with 512Mi (request 128Mi → 256Mi)"]
    summary = markdown_artifact("keruta-k-oom-retry")
    assert "## Attempts" in summary
    assert "| 1 | FAILED | OOMKilled | 128Mi / 256Mi |" in summary
    assert "| 2 | COMPLETED | - | 256Mi / 512Mi | 3600s | memory limit 256Mi → 512Mi; memory request 128Mi → 256Mi |" \
        in summary


@pytest.mark.usefixtures("prefect_server")
def test_an_oom_killed_attempt_is_retried_with_twice_the_memory_and_completes_locally(
        store: Store, tmp_path: Path) -> None:
    """Needs the agent to enforce the memory limit on the local backend (reporting errorCode OOMKilled)."""
    state = keruta_task(task_spec=oom_task("l-oom-retry", tmp_path / "first", timeoutSeconds=60), return_state=True)
    result = result_of(state)
    first, *_ = store.runs("l-oom-retry")
    assert first.reason == "OOMKilled", (first.reason, first.message)
    assert (result.status, result.attempt) == ("COMPLETED", 2), result
    assert result.resources is not None and result.resources.memory_limit == "512Mi"
    assert retry_lines(store, "l-oom-retry") == ["attempt 1 OOMKilled at 256Mi → attempt 2 with 512Mi"]
    assert "memory limit 256Mi → 512Mi" in markdown_artifact("keruta-l-oom-retry")


@pytest.mark.harness_only("the harness kubelet enforces the memory limit on local processes; the marker files are "
                          "on this machine")
@pytest.mark.usefixtures("prefect_server")
def test_a_system_failure_after_an_oom_retry_is_retried_as_it_was_with_the_raised_memory(
        cluster: Target, api: Api, store: Store, tmp_path: Path) -> None:
    cluster.create_secret("keruta-api-token", {"token": api.token})
    block = f"retry-{uuid.uuid4().hex[:8]}"
    seed(cluster.settings(api_url=api.url, artifacts_mode="off", default_memory_request=None), name=block)
    task = oom_task("k-oom-then-killed", tmp_path / "first", tmp_path / "second")
    result = keruta_task(task_spec=task, backend="kubernetes", settings_block=block)
    assert (result.status, result.attempt) == ("COMPLETED", 3)
    oom, killed, done = store.runs("k-oom-then-killed")
    assert (oom.reason, killed.reason, done.status) == ("OOMKilled", "AGENT_KILLED", "COMPLETED")
    # No memory request (the settings give none): the limit alone is raised, and kept by the unchanged retry.
    assert oom.resources == {"cpuRequest": "100m", "memoryLimit": "256Mi"}
    assert killed.resources == done.resources == {"cpuRequest": "100m", "memoryLimit": "512Mi"}
    assert retry_lines(store, "k-oom-then-killed") == ["attempt 1 OOMKilled at 256Mi → attempt 2 with 512Mi",
                                                       "attempt 2 AGENT_KILLED → attempt 3 unchanged"]


@pytest.mark.usefixtures("prefect_server")
def test_a_timed_out_attempt_is_retried_with_a_longer_timeout_when_the_setting_is_on(
        store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "timed-out-once"
    script = f'if [ ! -e "{marker}" ]; then touch "{marker}"; exec sleep 300; fi\necho in time'
    block = f"retry-{uuid.uuid4().hex[:8]}"
    seed(KerutaSettings(task_retry_deadline_factor=3), name=block)
    result = keruta_task(task_spec={"id": "l-deadline", "script": script, "timeoutSeconds": 1},
                         settings_block=block)
    assert (result.status, result.attempt) == ("COMPLETED", 2)
    first, second = store.runs("l-deadline")
    assert (first.reason, first.timeout_seconds, second.timeout_seconds) == ("TIMEOUT", 1, 3)
    assert retry_lines(store, "l-deadline") == ["attempt 1 TIMEOUT after 1s → attempt 2 with a timeout of 3s"]
    assert "timeout 1s → 3s" in markdown_artifact("keruta-l-deadline")


@pytest.mark.usefixtures("prefect_server")
def test_a_timed_out_attempt_is_not_retried_by_default(store: Store) -> None:
    result = result_of(keruta_task(task_spec={"id": "l-deadline-off", "script": "exec sleep 300",
                                              "timeoutSeconds": 1}, return_state=True))
    assert (result.status, result.reason, result.attempt) == ("FAILED", "TIMEOUT", 1)
    assert retry_lines(store, "l-deadline-off") == []
