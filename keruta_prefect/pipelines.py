"""Many keruta tasks from one flow run.

- ``keruta-pipeline``: a parent task, then its children (which share the parent's volume), and/or a
  fan-out of independent tasks; each task is a child flow run of ``keruta-task``.
- ``keruta-dispatch``: the original background processor, done right. It takes PENDING tasks by
  priority, claims each atomically (two dispatchers never run the same task), and runs them as child
  flow runs, in this process or handed to the ``keruta-task`` deployment's workers.

Both bound how many tasks run at once twice: by their own ``concurrency`` (threads in this process)
and by the Prefect global concurrency limit ``keruta-tasks`` (every pipeline and dispatcher together),
which is created with ``keruta.task.processor.concurrency`` slots if absent and edited in the Prefect UI.
"""

# No `from __future__ import annotations`: Prefect builds the flows' parameter models from these hints.
import uuid
from datetime import timedelta
from typing import Annotated, Any, Literal

from prefect import State, flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.futures import PrefectConcurrentFuture
from prefect.runtime import deployment as runtime_deployment
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.types import Name
from pydantic import BaseModel, Field

from keruta_prefect.backends import BackendName, get_backend
from keruta_prefect.blocks import DEFAULT_BLOCK, load_settings, shared_settings
from keruta_prefect.claims import ClaimLease, claim_owner, claim_pending_tasks, claim_task, pass_claim
from keruta_prefect.errors import PermanentError
from keruta_prefect.flows import KerutaTaskFailed, keruta_task
from keruta_prefect.limits import TASKS_LIMIT
from keruta_prefect.models import Task, TaskResult, TaskSpecError, TaskStatus, parse_task_spec
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store, get_store
from keruta_prefect.trees import release_volume

SCHEDULE_SLUG = "processing-delay"


class ChildRun(BaseModel):
    """One keruta task run by a pipeline or a dispatcher."""

    task_id: str
    status: str = Field(description="a task status; SUBMITTED when handed to a deployment; ERROR when "
                                    "the flow run itself failed before recording a result")
    flow_run_id: str | None = None
    result: TaskResult | None = None
    error: str | None = None


class PipelineResult(BaseModel):
    parent: ChildRun | None = None
    children: list[ChildRun] = Field(default_factory=list)

    @property
    def runs(self) -> list[ChildRun]:
        return ([self.parent] if self.parent else []) + self.children

    @property
    def completed(self) -> bool:
        return all(run.status == TaskStatus.COMPLETED for run in self.runs)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.status] = counts.get(run.status, 0) + 1
        return counts

    def summary(self) -> str:
        """E.g. "2 CANCELLED, 1 FAILED"."""
        return ", ".join(f"{n} {status}" for status, n in sorted(self.counts().items()))


class DispatchResult(BaseModel):
    dispatcher: str
    claimed: list[str] = Field(default_factory=list)
    runs: list[ChildRun] = Field(default_factory=list)


class PipelineFailed(PermanentError):
    """Some task of the pipeline did not complete; ``result`` holds every run."""

    def __init__(self, result: PipelineResult) -> None:
        super().__init__(f"keruta pipeline: {result.summary()}")
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (PipelineFailed, (self.result,))


# --- Prefect plumbing -------------------------------------------------------------------------------

def child_run(task_id: str, state: State[Any]) -> ChildRun:
    """What a keruta-task flow run's final state says about its task."""
    flow_run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    try:
        value = state.result()
    except KerutaTaskFailed as exc:
        return ChildRun(task_id=task_id, status=exc.result.status, flow_run_id=flow_run_id, result=exc.result,
                        error=str(exc))
    except BaseException as exc:  # the flow run failed or was cancelled before recording anything
        status = TaskStatus.CANCELLED.value if state.is_cancelled() else "ERROR"
        return ChildRun(task_id=task_id, status=status, flow_run_id=flow_run_id, error=str(exc) or type(exc).__name__)
    if not isinstance(value, TaskResult):
        return ChildRun(task_id=task_id, status="ERROR", flow_run_id=flow_run_id, error=str(state.message))
    return ChildRun(task_id=task_id, status=value.status, flow_run_id=flow_run_id, result=value)


@task(name="run-keruta-task", cache_policy=NO_CACHE, task_run_name="run-{task_id}")
def run_child(task_id: str, backend: str, settings_block: str, limit: str | None, claim: str | None) -> ChildRun:
    """One keruta task as a child flow run of ``keruta-task`` (which holds a slot of the global limit
    ``limit`` while its agent runs)."""
    state = keruta_task.with_options(flow_run_name=f"keruta-{task_id}")(
        task_id=task_id, backend=backend, settings_block=settings_block, claim=claim,
        concurrency_limit=limit, return_state=True)
    return child_run(task_id, state)


def run_many(task_ids: list[str], concurrency: int, backend: str, settings_block: str, limit: str | None,
             claim: str | None) -> list[ChildRun]:
    """Run tasks as child flow runs, at most ``concurrency`` at once in this process; in order of ids."""
    if not task_ids:
        return []
    runs: list[ChildRun] = []
    runner: ThreadPoolTaskRunner[ChildRun]
    with ThreadPoolTaskRunner(max_workers=max(1, min(concurrency, len(task_ids)))) as runner:
        # mypy picks submit's coroutine overload for a sync task (Prefect 3.9's overloads): the sync one applies
        futures: list[PrefectConcurrentFuture[ChildRun]] = [
            runner.submit(run_child, {  # type: ignore[arg-type]
                "task_id": task_id, "backend": backend, "settings_block": settings_block, "limit": limit,
                "claim": claim})
            for task_id in task_ids]
        for task_id, future in zip(task_ids, futures, strict=True):
            try:
                runs.append(future.result())
            except Exception as exc:  # e.g. the concurrency limit could not be acquired
                runs.append(ChildRun(task_id=task_id, status="ERROR", error=str(exc) or type(exc).__name__))
    return runs


def publish_runs(key: str, runs: list[ChildRun], description: str) -> None:
    if not runs:
        return
    rows = [{"task": run.task_id, "status": run.status,
             "reason": (run.result.reason if run.result else None) or "",
             "duration s": round(run.result.duration_seconds, 2) if run.result and run.result.duration_seconds else "",
             "artifacts": len(run.result.artifacts) if run.result else 0,
             "flow run": run.flow_run_id or "", "error": (run.error or "")[:200]} for run in runs]
    create_table_artifact(rows, key=key, description=description)


# --- keruta-pipeline --------------------------------------------------------------------------------

TaskRef = dict[str, Any] | str  # a task spec (keruta's camelCase JSON) or the id of a stored task


def check_pipeline(parent: TaskRef | None, children: list[TaskRef]) -> tuple[Task | str | None, list[Task | str]]:
    """Parse every spec (TaskSpecError naming ``parent`` or ``children[i]``); ids stay ids. Children of
    a parent default to ``parentId`` = the parent. Pure: nothing is read or stored."""
    def parse(ref: TaskRef, where: str, parent_id: str | None) -> Task | str:
        if isinstance(ref, str):
            return ref
        spec = parse_task_spec(ref, source=where)
        if parent_id and not spec.parent_id:
            spec = spec.model_copy(update={"parent_id": parent_id})
        return spec

    first = parse(parent, "parent", None) if parent is not None else None
    parent_id = first if isinstance(first, str) else first.id if first else None
    rest = [parse(ref, f"children[{i}]", parent_id) for i, ref in enumerate(children)]
    ids = [item if isinstance(item, str) else item.id for item in ([first] if first else []) + rest]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise TaskSpecError(f"children: task id {duplicates[0]!r} appears more than once")
    return first, rest


@task(name="plan-pipeline", cache_policy=NO_CACHE)
def plan_pipeline(store: Store, owner: str, parent: TaskRef | None,
                  children: list[TaskRef]) -> tuple[str | None, list[str]]:
    """Check every spec first (nothing is stored if one is bad), then store the tasks and claim them
    all for this pipeline, so that no dispatcher starts a child before its parent completed."""
    first, rest = check_pipeline(parent, children)
    tasks = [store.get_task(item) if isinstance(item, str) else item for item in ([first] if first else []) + rest]
    for item in tasks:
        stored, _ = store.get_or_create_task(item, claimed_by=owner)
        if stored.status != TaskStatus.COMPLETED:
            claim_task(store, stored.id, owner)
    ids = [t.id for t in tasks]
    return (ids[0] if first else None), (ids[1:] if first else ids)


@flow(name="keruta-pipeline")
def keruta_pipeline(
    parent: dict[str, Any] | str | None = None,
    children: list[dict[str, Any] | str] | None = None,
    concurrency: Annotated[int, Field(ge=1, le=1000)] = 4,
    backend: BackendName = "local",
    settings_block: str = DEFAULT_BLOCK,
    concurrency_limit: Name | Literal[""] | None = TASKS_LIMIT,
) -> PipelineResult:
    """Run ``parent`` (if given), then ``children`` with at most ``concurrency`` at once.

    Children default to ``parentId`` = the parent, so on Kubernetes they share its volume. When the parent
    does not complete, its children are CANCELLED without running. Tasks are given as specs (keruta's
    camelCase JSON) or ids of stored tasks. ``concurrency_limit`` names the Prefect global concurrency
    limit shared by every keruta pipeline and dispatcher (None: this flow's ``concurrency`` only)."""
    logger = get_run_logger()
    store = get_store()
    settings = load_settings(settings_block)
    owner = claim_owner()
    # the children's claims stay this run's while it works; they run with the settings read here
    with ClaimLease(store, owner), shared_settings(settings_block, settings):
        parent_id, child_ids = plan_pipeline(store, owner, parent, list(children or []))
        result = PipelineResult()
        if parent_id:
            (result.parent,) = run_many([parent_id], 1, backend, settings_block, concurrency_limit, owner)
            if result.parent.status != TaskStatus.COMPLETED and child_ids:
                logger.warning("parent task %s ended %s: its %d children do not run", parent_id, result.parent.status,
                               len(child_ids))
                result.children = [_not_run(store, child, f"parent task {parent_id} ended {result.parent.status}")
                                   for child in child_ids]
                _release_tree(store, settings, backend, parent_id)
                child_ids = []
        if child_ids:
            logger.info("running %d tasks, %d at a time", len(child_ids), concurrency)
            result.children = run_many(child_ids, concurrency, backend, settings_block, concurrency_limit, owner)
    publish_runs("keruta-pipeline", result.runs, "the tasks of this keruta pipeline")
    logger.info("keruta pipeline: %s", result.summary())
    if not result.completed:
        failure = PipelineFailed(result)
        return Failed(message=str(failure), data=failure)  # type: ignore[return-value]  # the flow's final state
    return result


def _not_run(store: Store, task_id: str, why: str) -> ChildRun:
    try:
        store.set_status(task_id, TaskStatus.CANCELLED, message=why)
    except ValueError:
        pass  # already final
    return ChildRun(task_id=task_id, status=store.get_task(task_id).status, error=why)


def _release_tree(store: Store, settings: KerutaSettings, backend: str, parent_id: str) -> None:
    """The parent ended and its children will not run: the tree is done, so its volume may go."""
    try:
        deleted = release_volume(store, get_backend(backend, settings, store), settings, store.get_task(parent_id),
                                 parent_id)
        if deleted is not None:
            get_run_logger().info("task tree %s is done: its volume %s was deleted", parent_id, deleted)
    except Exception as exc:
        get_run_logger().warning("the task tree's volume was not released: %s", exc)


# --- keruta-dispatch --------------------------------------------------------------------------------

@task(name="claim-pending-tasks", cache_policy=NO_CACHE)
def claim_pending(store: Store, owner: str, limit: int) -> list[str]:
    """Claim up to ``limit`` PENDING tasks, highest priority first. A claim is a compare-and-set in the
    database, so of two dispatchers racing for a task exactly one gets it; a claim left by a flow run
    that ended (a crashed dispatcher) is taken over."""
    return claim_pending_tasks(store, owner, limit)


@task(name="hand-over", cache_policy=NO_CACHE)
def hand_over(store: Store, owner: str, task_ids: list[str], deployment: str, backend: str,
              settings_block: str, limit: str | None) -> list[ChildRun]:
    """Create one flow run of the keruta-task deployment per task and pass the claim to it (its workers
    run it; each holds a slot of the global limit ``limit`` while its agent runs)."""
    from prefect.deployments import run_deployment

    runs = []
    for task_id in task_ids:
        created = run_deployment(deployment, timeout=0, as_subflow=True, flow_run_name=f"keruta-{task_id}",
                                 parameters={"task_id": task_id, "backend": backend, "settings_block": settings_block,
                                             "claim": owner, "concurrency_limit": limit})
        assert isinstance(created, FlowRun)  # called from sync code: the run itself, not a coroutine
        pass_claim(store, task_id, owner, str(created.id))
        runs.append(ChildRun(task_id=task_id, status="SUBMITTED", flow_run_id=str(created.id)))
    return runs


def follow_processing_delay(settings: KerutaSettings) -> None:
    """keruta.task.processor.processing-delay drives this deployment's `processing-delay` schedule:
    an edit of the settings block in the UI takes effect from the next run."""
    deployment_id = runtime_deployment.id
    if not deployment_id:
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import IntervalSchedule

    wanted = timedelta(milliseconds=settings.processing_delay_ms)
    with get_client(sync_client=True) as client:
        for schedule in client.read_deployment_schedules(uuid.UUID(deployment_id)):
            if schedule.slug != SCHEDULE_SLUG or not isinstance(schedule.schedule, IntervalSchedule):
                continue
            if schedule.schedule.interval != wanted:
                client.update_deployment_schedule(
                    uuid.UUID(deployment_id), schedule.id,
                    schedule=IntervalSchedule(interval=wanted, anchor_date=schedule.schedule.anchor_date))
                get_run_logger().info("schedule %r now every %s (keruta.task.processor.processing-delay)",
                                      SCHEDULE_SLUG, wanted)


@flow(name="keruta-dispatch")
def keruta_dispatch(
    max_tasks: Annotated[int, Field(ge=1, le=10000)] = 10,
    concurrency: Annotated[int, Field(ge=1, le=1000)] = 4,
    backend: BackendName = "local",
    settings_block: str = DEFAULT_BLOCK,
    concurrency_limit: Name | Literal[""] | None = TASKS_LIMIT,
    deployment: str | None = None,
) -> DispatchResult:
    """Take up to ``max_tasks`` PENDING tasks by priority, claim each, and run them: here as child flow
    runs (``concurrency`` at once, under the global limit), or — with ``deployment`` (e.g.
    ``keruta-task/default``) — as flow runs of that deployment, which its workers pick up."""
    logger = get_run_logger()
    store = get_store()
    settings = load_settings(settings_block)
    try:
        follow_processing_delay(settings)
    except Exception as exc:
        logger.warning("the dispatch schedule was not updated: %s", exc)
    owner = claim_owner()
    with ClaimLease(store, owner), shared_settings(settings_block, settings):
        claimed = claim_pending(store, owner, max_tasks)
        result = DispatchResult(dispatcher=owner, claimed=claimed)
        if not claimed:
            logger.info("no PENDING task to dispatch")
            return result
        logger.info("claimed %d PENDING tasks: %s", len(claimed), ", ".join(claimed))
        if deployment:
            result.runs = hand_over(store, owner, claimed, deployment, backend, settings_block, concurrency_limit)
        else:
            result.runs = run_many(claimed, concurrency, backend, settings_block, concurrency_limit, owner)
    publish_runs("keruta-dispatch", result.runs, "the tasks this dispatcher ran")
    return result
