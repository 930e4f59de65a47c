"""The failure taxonomy as a pure function: Pods and Job in, verdict out."""

from __future__ import annotations

from typing import Any

from keruta_prefect.backends.kubernetes.diagnose import diagnose, waiting_keys


def pod(name: str = "p", *, main: dict[str, Any] | None = None, init: list[dict[str, Any]] | None = None,
        conditions: list[dict[str, Any]] | None = None, created: str = "2026-01-01T00:00:00Z",
        deleting: bool = False, **status: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    return {"metadata": meta, "spec": {"containers": [{"name": "main", "resources": {"limits": {"memory": "2Gi"}}}]},
            "status": {"containerStatuses": [{"name": "main", "image": "img:1", "state": main or {}}],
                       "initContainerStatuses": init or [], "conditions": conditions or [], **status}}


def verdict(pods: list[dict[str, Any]], job: dict[str, Any] | None = None, waited: float = 0, **kw: Any) -> Any:
    waits = {key: waited for key in waiting_keys(pods)}
    return diagnose(pods, job, waited=waits, image_pull_grace=30, unschedulable_grace=300, **kw)


def test_running_is_no_verdict_but_starts_the_log() -> None:
    v = verdict([pod(main={"running": {}})])
    assert v.outcome is None and v.started == ["p"]


def test_agent_exit_codes() -> None:
    codes = {0: ("COMPLETED", None, False), 1: ("FAILED", "SCRIPT_FAILED", False),
             2: ("FAILED", "AGENT_CONFIG_ERROR", False), 3: ("FAILED", "API_UNREACHABLE", True),
             143: ("CANCELLED", "TERMINATED", False), 137: ("FAILED", "AGENT_KILLED", True)}
    for code, (status, reason, retryable) in codes.items():
        outcome = verdict([pod(main={"terminated": {"exitCode": code}})]).outcome
        assert (outcome.status, outcome.reason, outcome.retryable, outcome.exit_code) == (status, reason, retryable,
                                                                                          code)


def test_image_pull_errors_wait_for_the_grace_period_then_fail() -> None:
    pulling = pod(main={"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}})
    assert verdict([pulling], waited=5).outcome is None
    outcome = verdict([pulling], waited=31).outcome
    assert (outcome.status, outcome.reason, outcome.retryable) == ("FAILED", "ImagePullBackOff", False)


def test_an_invalid_image_name_fails_at_once() -> None:
    outcome = verdict([pod(main={"waiting": {"reason": "InvalidImageName", "message": "invalid reference"}})]).outcome
    assert outcome.reason == "InvalidImageName" and "is not valid" in outcome.message


def test_oom_names_the_limit() -> None:
    outcome = verdict([pod(main={"terminated": {"exitCode": 137, "reason": "OOMKilled"}})]).outcome
    assert outcome.reason == "OOMKilled" and "(limit 2Gi)" in outcome.message and not outcome.retryable


def test_an_init_container_failure() -> None:
    init = [{"name": "clone", "state": {"terminated": {"exitCode": 128}}}]
    outcome = verdict([pod(init=init, main={"waiting": {"reason": "PodInitializing"}})]).outcome
    assert (outcome.reason, outcome.exit_code) == ("INIT_FAILED", 128) and "init container clone" in outcome.message


def test_unschedulable_after_its_grace_period() -> None:
    pending = pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                               "message": "0/3 nodes are available: 3 Insufficient memory."}])
    early = verdict([pending], waited=10)
    assert early.outcome is None and "Insufficient memory" in early.notes[0]
    assert "Insufficient memory" in verdict([pending], waited=301).outcome.message


def test_a_disrupted_pod_is_a_note_and_the_newest_pod_speaks() -> None:
    evicted = pod("old", created="2026-01-01T00:00:00Z", reason="Evicted", message="low on memory",
                  main={"terminated": {"exitCode": 137}})
    replacement = pod("new", created="2026-01-01T00:05:00Z", main={"running": {}})
    v = verdict([evicted, replacement])
    assert v.outcome is None and v.started == ["new"]
    assert verdict([evicted]).outcome is None and "replacement" in verdict([evicted]).notes[0]


def test_job_conditions_deadline_policy_and_success() -> None:
    deadline = {"spec": {"activeDeadlineSeconds": 900}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}}
    outcome = verdict([], deadline).outcome
    assert outcome.reason == "DeadlineExceeded" and "(900s)" in outcome.message and not outcome.retryable
    policy = {"status": {"conditions": [{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy",
                                         "message": "exit code 2 matching FailJob rule"}]}}
    assert verdict([], policy).outcome.reason == "AGENT_CONFIG_ERROR"
    criteria = {"status": {"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]}}
    assert verdict([], criteria).outcome.status == "COMPLETED"  # Kubernetes >= 1.31 sets it before Complete


def test_a_pod_being_deleted_asks_for_the_job() -> None:
    v = verdict([pod(deleting=True, main={"terminated": {"exitCode": 143}})])
    assert v.outcome is None and v.need_job
    assert verdict([], None, job_known_missing=True).outcome.reason == "JOB_DELETED"
