"""How an agent Job is doing, from its Pods and (when needed) the Job itself. Pure: dicts in, verdict out.

Every failure gets a short reason and a message that says what to do. ``retryable`` marks the system
failures worth a new attempt; everything else fails the task at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keruta_prefect.contract import ExitCode, Reason
from keruta_prefect.models import TaskStatus
from keruta_prefect.outcomes import AgentExit, Outcome, outcome_of

PULL_ERRORS = {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "RegistryUnavailable"}
CONFIG_ERRORS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}

@dataclass
class Verdict:
    outcome: Outcome | None = None
    exit: AgentExit | None = None  # the agent ended: the facts (the backend adds the agent's own report)
    notes: list[str] = field(default_factory=list)  # worth telling the user once each
    started: list[str] = field(default_factory=list)  # pods whose main container has started (follow logs)
    need_job: bool = False  # the Pods cannot tell: read the Job


def _created(pod: dict[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("creationTimestamp") or ""


def _statuses(pod: dict[str, Any], init: bool = False) -> list[dict[str, Any]]:
    return (pod.get("status") or {}).get("initContainerStatuses" if init else "containerStatuses") or []


def _main_state(pod: dict[str, Any]) -> dict[str, Any]:
    for status in _statuses(pod):
        if status.get("name") == "main":
            return status.get("state") or {}
    return {}


def disrupted(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("reason") == "Evicted" or any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in status.get("conditions") or [])


def agent_exit(terminated: dict[str, Any], memory_limit: str | None, note: str | None = None,
               default_code: int = 0) -> AgentExit:
    """The facts of a terminated agent container (its state.terminated)."""
    return AgentExit(code=int(terminated.get("exitCode", default_code)),
                     oom_killed=terminated.get("reason") == Reason.OOM_KILLED, memory_limit=memory_limit, note=note)


def _ended(verdict: Verdict, facts: AgentExit) -> Verdict:
    verdict.exit = facts
    verdict.outcome = outcome_of(facts, None)  # the facts alone; the backend adds the agent's report
    return verdict


def diagnose(pods: list[dict[str, Any]], job: dict[str, Any] | None, *, waited: dict[str, float],
             image_pull_grace: float, unschedulable_grace: float, job_known_missing: bool = False) -> Verdict:
    """The verdict for a Job, given its Pods (any order), the Job if it was read, and how long each
    waiting reason has been seen (``waited``: "pod/container/reason" → seconds)."""
    verdict = Verdict()
    if job_known_missing:
        verdict.outcome = Outcome(status=TaskStatus.FAILED, reason=Reason.JOB_DELETED,
                                  message="the Job was deleted by someone else before the task finished")
        return verdict
    if job is not None:
        from_job = _job_outcome(job, pods)
        if isinstance(from_job, AgentExit):
            return _ended(verdict, from_job)
        if from_job is not None:
            verdict.outcome = from_job
            return verdict
    for pod in sorted(pods, key=_created, reverse=True):
        name = pod["metadata"]["name"]
        main = _main_state(pod)
        if "running" in main or "terminated" in main:
            verdict.started.append(name)
        if disrupted(pod):
            verdict.notes.append(f"Pod {name} was disrupted ({(pod.get('status') or {}).get('message') or 'evicted'});"
                                 " Kubernetes starts a replacement Pod (a system failure, not the task's)")
            continue
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            # Someone is deleting the Pod: only the Job can say whether it is gone (deleted by someone
            # else) or about to start a replacement.
            verdict.need_job = True
            continue
        if "terminated" in main:
            terminated = main["terminated"]
            limit = next(((c.get("resources") or {}).get("limits", {}).get("memory")
                          for c in pod.get("spec", {}).get("containers", []) if c.get("name") == "main"), None)
            return _ended(verdict, agent_exit(terminated, limit))
        for status in _statuses(pod, init=True):
            terminated = (status.get("state") or {}).get("terminated")
            if terminated and int(terminated.get("exitCode", 0)) != 0:
                verdict.outcome = Outcome(
                    status=TaskStatus.FAILED, exit_code=int(terminated["exitCode"]), reason=Reason.INIT_FAILED,
                    message=f"init container {status['name']} failed with exit code {terminated['exitCode']} "
                            "(the repository could not be prepared); see the Pod's log of that container")
                return verdict
        waiting_outcome = _waiting(pod, waited, image_pull_grace, verdict)
        if waiting_outcome is not None:
            verdict.outcome = waiting_outcome
            return verdict
        scheduled = next((c for c in (pod.get("status") or {}).get("conditions") or []
                          if c.get("type") == "PodScheduled"), None)
        if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            key = f"{name}/-/Unschedulable"
            message = scheduled.get("message") or "no node fits"
            if waited.get(key, 0) >= unschedulable_grace:
                verdict.outcome = Outcome(
                    status=TaskStatus.FAILED, reason=Reason.UNSCHEDULABLE,
                    message=f"no node can run the agent Pod: {message}; lower the task's resources or add capacity")
                return verdict
            verdict.notes.append(f"Pod {name} is not scheduled yet: {message}")
        return verdict  # only the newest live Pod speaks
    return verdict


def _waiting(pod: dict[str, Any], waited: dict[str, float], grace: float, verdict: Verdict) -> Outcome | None:
    name = pod["metadata"]["name"]
    for init in (True, False):
        for status in _statuses(pod, init=init):
            waiting = (status.get("state") or {}).get("waiting")
            if not waiting:
                continue
            reason = waiting.get("reason") or ""
            message = waiting.get("message") or ""
            container = status.get("name")
            image = status.get("image") or ""
            if reason == "InvalidImageName":
                return Outcome(status=TaskStatus.FAILED, reason=reason,
                               message=f"the image name {image!r} of container {container} is not valid: {message}")
            if reason in PULL_ERRORS:
                verdict.notes.append(f"Pod {name}: {reason} for image {image}: {message}")
                if waited.get(f"{name}/{container}/{reason}", 0) >= grace or any(
                        waited.get(f"{name}/{container}/{r}", 0) >= grace for r in PULL_ERRORS):
                    return Outcome(status=TaskStatus.FAILED, reason=Reason.IMAGE_PULL_BACK_OFF,
                                   message=f"image {image} cannot be pulled ({reason}: {message}); check the image "
                                           "name and tag, and keruta.kubernetes.image-pull-secrets for private "
                                           "registries")
            if reason in CONFIG_ERRORS:
                verdict.notes.append(f"Pod {name}: {reason}: {message}")
                if waited.get(f"{name}/{container}/{reason}", 0) >= grace:
                    hint = ""
                    if "secret" in message.lower():
                        hint = ("; create it, e.g. kubectl create secret generic keruta-api-token "
                                "--from-literal=token=… (see keruta.kubernetes.token-secret-name)")
                    return Outcome(status=TaskStatus.FAILED, reason=reason,
                                   message=f"container {container} cannot be configured: {message}{hint}")
    return None


def waiting_keys(pods: list[dict[str, Any]]) -> set[str]:
    """The "pod/container/reason" keys of everything waiting now (for ``waited``)."""
    keys = set()
    for pod in pods:
        name = pod["metadata"]["name"]
        for init in (True, False):
            for status in _statuses(pod, init=init):
                waiting = (status.get("state") or {}).get("waiting")
                if waiting and waiting.get("reason"):
                    keys.add(f"{name}/{status.get('name')}/{waiting['reason']}")
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("reason") == "Unschedulable":
                keys.add(f"{name}/-/Unschedulable")
    return keys


def _job_outcome(job: dict[str, Any], pods: list[dict[str, Any]]) -> Outcome | AgentExit | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        kind, reason = condition.get("type"), condition.get("reason") or ""
        if kind in ("Complete", "SuccessCriteriaMet"):
            return AgentExit(code=ExitCode.OK)
        if kind in ("Failed", "FailureTarget"):
            if reason == "DeadlineExceeded":
                deadline = job.get("spec", {}).get("activeDeadlineSeconds")
                return Outcome(status=TaskStatus.FAILED, reason=Reason.DEADLINE_EXCEEDED,
                               message=f"the Job ran longer than its deadline ({deadline}s); raise the task's "
                                       "timeoutSeconds")
            if reason == "PodFailurePolicy":
                return AgentExit(code=ExitCode.CONFIG, note=condition.get("message", ""))
            last = sorted(pods, key=_created)[-1] if pods else None
            terminated = _main_state(last).get("terminated") if last else None
            if terminated:
                return agent_exit(terminated, None, note=reason, default_code=ExitCode.TASK_FAILED)
            return Outcome(status=TaskStatus.FAILED, reason=reason or Reason.JOB_FAILED,
                           message=condition.get("message") or "the Job failed")
    return None
