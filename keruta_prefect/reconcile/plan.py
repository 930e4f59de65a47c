"""The reconciler's decisions: from what was observed (:class:`Facts`) to what to do (a list of :class:`Action`).

Pure: no I/O, no clock (``Facts.now``). The rules (README, "the reconciler"):

- nothing a live flow run owns is touched: a flow run in a non-final Prefect state owns the Jobs, Pods,
  agents and work directories labelled or recorded with its id, and every task it names (its parameters,
  its unfinished attempts, its claim);
- nothing younger than the grace period is touched (a Job is created just before its run is recorded);
- keruta's Jobs and Pods (Pending ones too) whose flow run is final, gone or none, past the grace period,
  are deleted (Foreground); a Pod whose Job is still there goes with its Job;
- a task tree's volume is deleted when no task of the tree is unfinished (keruta.kubernetes.pvc-retention);
- a task IN_PROGRESS or RETRYING whose attempt has no live Job, agent or flow run is LOST: FAILED, or
  queued again (keruta.reconcile.lost-tasks=requeue) while it has attempts left;
- a claim on a PENDING task whose holder no longer holds it (:func:`keruta_prefect.claims.holds`) is released;
- the local backend's agents of dead runs are stopped and their work directories removed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field

from keruta_prefect.claims import FINAL_STATES, holds
from keruta_prefect.contract import TaskStatus

ActionKind = Literal["delete-job", "delete-pod", "delete-pvc", "stop-agent", "fail-lost-task", "requeue-lost-task",
                     "release-claim", "remove-work-dir"]
KubeKind = Literal["Job", "Pod", "PersistentVolumeClaim"]
# The order the actions are carried out in: agents and Jobs first (nothing runs any more), then the records.
ORDER: tuple[ActionKind, ...] = ("stop-agent", "delete-job", "delete-pod", "fail-lost-task", "requeue-lost-task",
                                 "release-claim", "delete-pvc", "remove-work-dir")
LOST_STATUSES = frozenset({TaskStatus.IN_PROGRESS, TaskStatus.RETRYING})


class KubeObject(BaseModel):
    """One of keruta-prefect's Jobs, Pods or PersistentVolumeClaims, as listed."""

    kind: KubeKind
    name: str
    namespace: str
    uid: str | None = None
    created: datetime | None = None
    task_id: str | None = None  # the task (a volume: the root of its tree)
    flow_run_id: str | None = None
    attempt: int | None = None
    owner_job: str | None = None  # a Pod: the Job that owns it
    finished: bool = False  # a Job with a Complete/Failed condition, a Pod Succeeded/Failed
    deleting: bool = False  # its deletion has begun


class TaskFact(BaseModel):
    id: str
    status: TaskStatus
    updated_at: datetime
    claimed_by: str | None = None
    lease_expires: datetime | None = None  # of the claim's holder
    attempts: int = 0  # attempts recorded so far
    namespace: str | None = None  # where its Jobs are (Kubernetes)


class RunFact(BaseModel):
    """An attempt not recorded as ended."""

    id: int
    task_id: str
    flow_run_id: str | None = None
    backend: str = "local"
    attempt: int = 1
    job_name: str | None = None
    namespace: str | None = None
    pid: int | None = None


class AgentFact(BaseModel):
    """A local agent process (found in the process table, under the local work root)."""

    pid: int
    task_id: str
    work_dir: str
    attempt: int | None = None
    started: datetime | None = None


class WorkDirFact(BaseModel):
    """A local attempt's work directory: ``<work root>/<task>/attempt-<n>``."""

    path: str
    task_id: str | None = None  # None: no stored task has this directory's name
    attempt: int
    modified: datetime | None = None


class Facts(BaseModel):
    now: datetime
    grace_seconds: int = 300
    lost_tasks: Literal["fail", "requeue"] = "fail"
    max_attempts: int = 3
    pvc_retention: Literal["delete", "keep"] = "delete"
    objects: list[KubeObject] = Field(default_factory=list)
    kube_checked: set[str] = Field(default_factory=set)  # the namespaces whose objects were all listed
    tasks: dict[str, TaskFact] = Field(default_factory=dict)  # the tasks the rest names, and all unfinished ones
    runs: list[RunFact] = Field(default_factory=list)
    flow_runs: dict[str, str] = Field(default_factory=dict)  # flow run id → Prefect state type; absent: gone
    flow_run_since: dict[str, datetime] = Field(default_factory=dict)  # flow run id → when it entered that state
    kube_enabled: bool = True  # keruta.kubernetes.enabled: a task with no recorded attempt may have a Job
    named_by: dict[str, list[str]] = Field(default_factory=dict)  # task → live keruta-task flow runs naming it
    trees: dict[str, list[str]] = Field(default_factory=dict)  # a volume's root task → the tasks of its tree
    agents: list[AgentFact] = Field(default_factory=list)
    work_dirs: list[WorkDirFact] = Field(default_factory=list)


class Action(BaseModel):
    kind: ActionKind
    name: str  # the object's, the task's (tasks, claims) or the path (work directories)
    namespace: str | None = None
    why: str
    task_id: str | None = None
    uid: str | None = None
    pid: int | None = None
    attempt: int | None = None
    holder: str | None = None  # release-claim and lost tasks: the claim's holder as seen (compare-and-set)
    run_ids: list[int] = Field(default_factory=list)  # lost tasks: the attempts closed with them


class Liveness:
    """Who is alive, and how old things are, as the facts tell (the questions every rule asks)."""

    def __init__(self, facts: Facts) -> None:
        self.f = facts
        self.grace = timedelta(seconds=facts.grace_seconds)

    def state(self, flow_run_id: str | None) -> str | None:
        return self.f.flow_runs.get(flow_run_id) if flow_run_id else None

    def live(self, flow_run_id: str | None) -> bool:
        """A flow run in a non-final state (Running, Pending, Scheduled, Paused, Cancelling…)."""
        state = self.state(flow_run_id)
        return state is not None and state not in FINAL_STATES

    def owner(self, task_id: str | None) -> str | None:
        """A live flow run that owns the task: one naming it, running an attempt of it, or holding its claim."""
        if not task_id:
            return None
        candidates = [*self.f.named_by.get(task_id, []),
                      *(run.flow_run_id for run in self.f.runs if run.task_id == task_id and run.flow_run_id)]
        task = self.f.tasks.get(task_id)
        if task is not None and task.claimed_by and holds(self.state(task.claimed_by), task.lease_expires, self.f.now):
            candidates.append(task.claimed_by)
        return next((c for c in candidates if self.live(c)), None)

    def young(self, when: datetime | None) -> bool:
        return when is None or self.f.now - when < self.grace

    def just_ended(self, flow_run_id: str | None) -> bool:
        """The flow run entered its final state within the grace period: a rerun of a crashed one may be
        about to reattach to what it left."""
        since = self.f.flow_run_since.get(flow_run_id) if flow_run_id else None
        return since is not None and self.f.now - since < self.grace

    def flow_run_said(self, flow_run_id: str | None) -> str:
        if not flow_run_id:
            return "it names no flow run"
        state = self.state(flow_run_id)
        return f"its flow run {flow_run_id} is {state}" if state else f"its flow run {flow_run_id} no longer exists"

    def task_said(self, task_id: str | None) -> str:
        task = self.f.tasks.get(task_id or "")
        if task is None:
            return f"task {task_id} is not stored" if task_id else "it names no task"
        return f"task {task_id} is {task.status}"



class Planner(Liveness):
    """One pass of the rules over one set of facts (see the module)."""

    def __init__(self, facts: Facts) -> None:
        super().__init__(facts)
        self.actions: list[Action] = []

    def add(self, kind: ActionKind, name: str, why: str, **more: object) -> None:
        self.actions.append(Action(kind=kind, name=name, why=why, **more))  # type: ignore[arg-type]

    def plan(self) -> list[Action]:
        jobs = {(o.namespace, o.name) for o in self.f.objects if o.kind == "Job"}
        for obj in self.f.objects:
            if obj.kind == "PersistentVolumeClaim":
                self.volume(obj)
            elif obj.kind == "Job" or (obj.namespace, obj.owner_job) not in jobs:
                self.job_or_pod(obj)
        stopped = self.local_agents()
        self.lost_tasks(stopped)
        self.claims()
        self.work_dirs(stopped)
        return sorted(self.actions, key=lambda a: (ORDER.index(a.kind), a.namespace or "", a.name))

    def job_or_pod(self, obj: KubeObject) -> None:
        if (obj.deleting or self.young(obj.created) or self.live(obj.flow_run_id) or self.just_ended(obj.flow_run_id)
                or self.owner(obj.task_id)):
            return
        kind: ActionKind = "delete-job" if obj.kind == "Job" else "delete-pod"
        what = f"{obj.kind} of attempt {obj.attempt} of task {obj.task_id}" if obj.task_id else obj.kind
        pending = " (Pending)" if obj.kind == "Pod" and not obj.finished else ""
        self.add(kind, obj.name, f"{what}{pending}: {self.flow_run_said(obj.flow_run_id)}; "
                 f"{self.task_said(obj.task_id)}", namespace=obj.namespace, task_id=obj.task_id, uid=obj.uid,
                 attempt=obj.attempt)

    def volume(self, obj: KubeObject) -> None:
        if self.f.pvc_retention != "delete" or obj.deleting or self.young(obj.created):
            return
        tree = self.f.trees.get(obj.task_id or "", [])
        unfinished = [t for t in tree if t in self.f.tasks and not self.f.tasks[t].status.terminal]
        if unfinished or any(self.owner(t) for t in tree):
            return
        self.add("delete-pvc", obj.name, f"volume of task tree {obj.task_id}: no task of the tree is unfinished "
                 f"({len(tree)} stored)", namespace=obj.namespace, task_id=obj.task_id, uid=obj.uid)

    def local_agents(self) -> set[int]:
        """Stop the agents of dead runs; the pids stopped."""
        stopped = set()
        for agent in self.f.agents:
            run = next((r for r in self.f.runs if r.backend == "local" and r.pid == agent.pid
                        and r.task_id == agent.task_id), None)
            flow_run = run.flow_run_id if run else None
            if (self.young(agent.started) or self.live(flow_run) or self.just_ended(flow_run)
                    or self.owner(agent.task_id)):
                continue
            recorded = f"attempt {run.attempt}: {self.flow_run_said(flow_run)}" if run else "no open run records it"
            self.add("stop-agent", str(agent.pid), f"local agent of task {agent.task_id} ({recorded}; "
                     f"{self.task_said(agent.task_id)})", task_id=agent.task_id, pid=agent.pid,
                     attempt=run.attempt if run else agent.attempt)
            stopped.add(agent.pid)
        return stopped

    def lost_tasks(self, stopped: set[int]) -> None:
        deleted = {(a.namespace, a.name) for a in self.actions if a.kind in ("delete-job", "delete-pod")}
        for task in self.f.tasks.values():
            if task.status not in LOST_STATUSES or self.young(task.updated_at) or self.owner(task.id):
                continue
            runs = [r for r in self.f.runs if r.task_id == task.id]
            if any(self.just_ended(r.flow_run_id) for r in runs):
                continue  # a rerun may be about to reattach to it
            namespaces = {task.namespace} | {r.namespace for r in runs if r.backend == "kubernetes"}
            on_kubernetes = any(r.backend == "kubernetes" for r in runs) or (not runs and self.f.kube_enabled)
            if on_kubernetes and not namespaces <= self.f.kube_checked:
                continue  # its Jobs could not be looked at: nothing is known to be lost
            jobs = [o for o in self.f.objects if o.kind != "PersistentVolumeClaim" and o.task_id == task.id
                    and not o.finished and not o.deleting and (o.namespace, o.name) not in deleted
                    and (o.namespace, o.owner_job) not in deleted]  # a Pod goes with its Job (Foreground)
            agents = [a for a in self.f.agents if a.task_id == task.id and a.pid not in stopped]
            if jobs or agents:
                continue
            last = max(runs, key=lambda r: r.attempt, default=None)
            said = (f"attempt {last.attempt} ({last.backend}) has no live Job or agent and "
                    f"{self.flow_run_said(last.flow_run_id)}") if last else "no attempt of it is recorded as running"
            requeue = self.f.lost_tasks == "requeue" and task.attempts < self.f.max_attempts
            kind: ActionKind = "requeue-lost-task" if requeue else "fail-lost-task"
            left = (f"; queued again (attempt {task.attempts} of {self.f.max_attempts})" if requeue else
                    f"; not queued again: {task.attempts} of {self.f.max_attempts} attempts used"
                    if self.f.lost_tasks == "requeue" else "")
            self.add(kind, task.id, f"task {task.status}: {said}{left}", task_id=task.id,
                     run_ids=[r.id for r in runs], attempt=last.attempt if last else None, holder=task.claimed_by)

    def claims(self) -> None:
        for task in self.f.tasks.values():
            holder = task.claimed_by
            if task.status != TaskStatus.PENDING or not holder or self.young(task.updated_at):
                continue
            state = self.state(holder)
            if holds(state, task.lease_expires, self.f.now):
                continue
            if state is None:
                why = f"flow run {holder}, which no longer exists"
            elif state in FINAL_STATES:
                why = f"flow run {holder}, which is {state}"
            else:
                why = f"flow run {holder}, {state} but its lease expired at {task.lease_expires:%Y-%m-%d %H:%M:%S}Z"
            self.add("release-claim", task.id, f"claim on PENDING task {task.id} held by {why}", task_id=task.id,
                     holder=holder)

    def work_dirs(self, stopped: set[int]) -> None:
        in_use = {a.work_dir for a in self.f.agents if a.pid not in stopped}
        for work in self.f.work_dirs:
            if work.path in in_use or self.young(work.modified) or self.owner(work.task_id):
                continue
            run = next((r for r in self.f.runs if r.backend == "local" and r.task_id == work.task_id
                        and r.attempt == work.attempt), None)
            if run is not None:
                continue  # an attempt not recorded as ended: its directory goes once it is (this pass may end it)
            said = self.task_said(work.task_id) if work.task_id else "no stored task has its name"
            self.add("remove-work-dir", work.path, f"work directory of attempt {work.attempt}: no agent runs in "
                     f"it; {said}", task_id=work.task_id, attempt=work.attempt)


def plan(facts: Facts) -> list[Action]:
    """What to do about what was observed (see the module's rules), in the order to do it."""
    return Planner(facts).plan()
