"""The `keruta-task` flow: settings → task → launch → wait → collect artifacts → record → summary.

Each Prefect task is one step with one reason to retry:
- launch / wait are retried (with backoff) only for :class:`TransientBackendError`;
- whether an attempt that ended gets a new one is the retry policy's (keruta_prefect.retries.decide): a
  system failure (agent lost, API unreachable, Pod evicted…) a new attempt as it was, OOMKilled one with
  more memory, a deadline (if set) one with a longer timeout; the script's own failure never; up to
  ``keruta.task.max-attempts``;
- record-run is retried on database errors.
"""

# No `from __future__ import annotations` here: Prefect rebuilds the flow's parameter model from its
# signature when a deployment runs it, and string annotations do not resolve there.
import time
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import Flow, State, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Failed
from prefect.tasks import exponential_backoff
from prefect.types import Name
from sqlalchemy.exc import OperationalError

from keruta_prefect.artifacts import CollectResult, attempt_dir
from keruta_prefect.backends import BackendName, get_backend
from keruta_prefect.backends.base import (
    Backend,
    BackendError,
    Outcome,
    RunContext,
    RunHandle,
    TransientBackendError,
)
from keruta_prefect.blocks import DEFAULT_BLOCK, load_settings
from keruta_prefect.cancel import handle_of, mark_cancelled, set_status_quietly, stop_flow_run_agents
from keruta_prefect.claims import ClaimLease, claim_owner, claim_task
from keruta_prefect.contract import ArtifactsMode, Reason
from keruta_prefect.errors import PermanentError, TransientError
from keruta_prefect.limits import TASKS_LIMIT, SlotUnavailable, task_slot
from keruta_prefect.models import (
    InvalidTransition,
    Resources,
    Task,
    TaskResult,
    TaskStatus,
    overlay,
    parse_task_spec,
)
from keruta_prefect.progress import ProgressReporter
from keruta_prefect.retries import Decision, Ended, decide
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import LogLine, Store, TaskRunRow, get_store
from keruta_prefect.summary import publish_summary, publish_unrecorded, recorded_result
from keruta_prefect.trees import release_volume, root_of
from keruta_prefect.validation import exception_line


class KerutaTaskFailed(PermanentError):
    """The keruta task ended FAILED or CANCELLED; ``result`` holds everything that was recorded."""

    def __init__(self, result: TaskResult) -> None:
        detail = f"{result.reason}: " if result.reason else ""
        code = f" (exit code {result.exit_code})" if result.exit_code is not None else ""
        super().__init__(f"keruta task {result.task_id} {result.status}{code}: {detail}{result.message or ''}")
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, so a deployment's caller gets it back whole
        return (KerutaTaskFailed, (self.result,))


def _retry_on(*types: type[BaseException]) -> Any:
    def condition(_task: Any, _task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except types:
            return True
        except BaseException:
            return False
        return False

    return condition


# --- the steps --------------------------------------------------------------------------------------

@task(name="prepare-task", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(0.5),
      retry_condition_fn=_retry_on(OperationalError))
def prepare_task(store: Store, task_id: str | None, task_spec: dict[str, Any] | str | None, owner: str,
                 handed_over_by: str | None = None) -> Task:
    """Get the task (by id) or create it (from a spec), and claim it for this flow run; a failed or
    cancelled task is queued again. A task still IN_PROGRESS is returned as it is: the flow
    reattaches to its unfinished attempt."""
    if task_spec is not None:
        parsed = parse_task_spec(task_spec, source="task_spec")
        if task_id is not None and parsed.id != task_id:
            parsed = parsed.model_copy(update={"id": task_id})
        current, _created = store.get_or_create_task(parsed, claimed_by=owner)  # no dispatcher can take it first
    elif task_id is not None:
        current = store.get_task(task_id)
    else:
        raise ValueError("give task_id (a stored task) or task_spec (a task in keruta's JSON form)")
    if current.status == TaskStatus.COMPLETED:
        return current
    return claim_task(store, current.id, owner, handed_over_by)


@task(name="launch-agent", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=_retry_on(TransientError))
def launch_agent(backend: Backend, store: Store, task: Task, ctx: RunContext) -> tuple[RunHandle, int]:
    handle = backend.launch(task, ctx)
    run = store.start_run(TaskRunRow(
        task_id=task.id, flow_run_id=ctx.flow_run_id, backend=backend.name, attempt=ctx.attempt,
        job_name=handle.name, namespace=handle.namespace, job_uid=handle.uid, pid=handle.pid,
        resources=handle.resources.model_dump(by_alias=True, exclude_none=True) if handle.resources else None,
        timeout_seconds=handle.timeout_seconds,
    ))
    assert run.id is not None
    return handle, run.id


@task(name="wait-for-agent", cache_policy=NO_CACHE, retries=5, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=_retry_on(TransientError))
def wait_for_agent(backend: Backend, store: Store, handle: RunHandle, max_prefect_lines: int) -> Outcome:
    logger = get_run_logger()
    count = 0

    def on_log(level: str, message: str) -> None:
        nonlocal count
        count += 1
        if count <= max_prefect_lines:
            logger.log(40 if level in ("ERROR", "CRITICAL") else 30 if level.startswith("WARN") else 20, message)
        elif count == max_prefect_lines + 1:
            logger.warning("more task log lines are stored in the keruta database only "
                           "(keruta.logs.prefect-max-lines=%d)", max_prefect_lines)

    with ProgressReporter(store, handle.task_id):
        return backend.wait(handle, on_log)


@task(name="collect-artifacts", cache_policy=NO_CACHE)
def collect_artifacts(backend: Backend, handle: RunHandle, settings: KerutaSettings) -> CollectResult:
    if settings.artifacts_mode == ArtifactsMode.OFF.value:
        return CollectResult()
    dest = attempt_dir(settings.storage_root(), handle.task_id, handle.attempt)
    try:
        return backend.collect(handle, dest)
    except Exception as exc:  # however collection failed, the run is still recorded: the files are lost, said why
        get_run_logger().warning("collecting the files of task %s failed", handle.task_id, exc_info=True)
        return CollectResult(lost=f"artifacts lost: {exception_line(exc)}")


@task(name="record-run", cache_policy=NO_CACHE, retries=5, retry_delay_seconds=exponential_backoff(0.5),
      retry_condition_fn=_retry_on(OperationalError))
def record_run(store: Store, run_id: int, task: Task, outcome: Outcome, collected: CollectResult) -> TaskResult:
    """Write the outcome to the task, its run and its artifacts; answer with what is now recorded."""
    if store.get_task(task.id).status != outcome.status:
        try:
            store.set_status(task.id, outcome.status, message=outcome.message, error_code=outcome.reason)
        except InvalidTransition:
            pass  # the agent (or a cancel) already set a final status; that word stands
    store.update_run(run_id, status=outcome.status.value, exit_code=outcome.exit_code, reason=outcome.reason,
                     message=outcome.message, finished_at=datetime.now(UTC), artifacts_note=collected.note())
    if collected.uploaded:
        store.claim_uploads(task.id, run_id)
    else:
        store.add_artifacts(task.id, run_id, collected.files)
    return recorded_result(store, task.id)


def _on_cancel(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:  # Prefect's hook signature
    parameters = flow_run.parameters or {}
    stop_flow_run_agents(str(flow_run.id), parameters.get("settings_block") or DEFAULT_BLOCK,
                         parameters.get("backend"), parameters)


# --- the flow ---------------------------------------------------------------------------------------

# Cancelling stops the agents. A crash does not: the Job goes on (bounded by its deadline and TTL) and
# a rerun of the flow reattaches to it instead of starting the task over.
@flow(name="keruta-task", on_cancellation=[_on_cancel])
def keruta_task(
    task_id: str | None = None,
    task_spec: dict[str, Any] | None = None,
    backend: BackendName = "local",
    settings_block: str = DEFAULT_BLOCK,
    claim: str | None = None,
    concurrency_limit: Name | Literal[""] | None = TASKS_LIMIT,
) -> TaskResult:
    """Run one keruta task: by ``task_id`` (a stored task) or ``task_spec`` (keruta's camelCase JSON).

    ``claim`` is set by keruta-dispatch: the flow run that claimed the task hands it over to this one.
    While its agent runs, the flow run holds a slot of the Prefect global concurrency limit
    ``concurrency_limit`` (``keruta-tasks``: created with keruta.task.processor.concurrency slots if
    absent, edited in the UI), however it was started; ``None`` runs without it."""
    logger = get_run_logger()
    settings = load_settings(settings_block)
    store = get_store()
    try:
        runner = get_backend(backend, settings, store)
    except BackendError as exc:  # e.g. "Kubernetes integration is disabled (keruta.kubernetes.enabled=false)"
        logger.error("%s", exc)
        return Failed(message=str(exc))  # type: ignore[return-value]  # a State returned by a flow is its final state
    owner = claim_owner()
    task_ = prepare_task(store, task_id, task_spec, owner, claim)
    if task_.status == TaskStatus.COMPLETED:
        # COMPLETED is final: running it again would be a new task. Answer with what was recorded
        # (this also makes a rerun of a flow run that crashed after the task completed harmless).
        logger.info("keruta task %s is already COMPLETED; returning its recorded result", task_.id)
        return recorded_result(store, task_.id)
    logger.info("keruta task %s (%s) on the %s backend", task_.id, task_.title or "untitled", runner.name)
    try:
        with ClaimLease(store, owner), task_slot(concurrency_limit, settings.processor_concurrency):
            ended = run_attempts(runner, store, settings, task_)
    except SlotUnavailable as exc:  # the task stays PENDING; its claim goes with this (failed) flow run
        logger.error("%s", exc)
        return Failed(message=str(exc))  # type: ignore[return-value]  # a State returned by a flow is its final state
    if isinstance(ended, TaskResult):
        result = ended
    else:
        # the database did not take the outcome: Failed, the outcome kept in Prefect
        return ended  # type: ignore[return-value]  # a State returned by a flow is its final state
    publish_summary(store, task_, result)
    if result.status != TaskStatus.COMPLETED:
        # A task that failed is an expected outcome, not a crash: a Failed state (no traceback) whose
        # result() raises KerutaTaskFailed carrying the whole TaskResult.
        failure = KerutaTaskFailed(result)
        logger.error("%s", failure)
        return Failed(message=str(failure), data=failure)  # type: ignore[return-value]  # a State returned by a flow is its final state
    logger.info("keruta task %s COMPLETED", task_.id)
    return result


def run_attempts(runner: Backend, store: Store, settings: KerutaSettings, task_: Task) -> TaskResult | State[Any]:
    """Attempts of the task until one ends it: reattach to an unfinished one first, then launch new ones.

    Every attempt counts toward keruta.task.max-attempts, a reattached or stopped one included. An
    unfinished attempt the backend cannot follow from here (a local agent whose flow process died: its
    embedded API and token died with it) is stopped and recorded LOST before a new attempt starts.
    Returns the recorded TaskResult, or a Failed state when the database did not take it."""
    logger = get_run_logger()
    flow_run_id = str(runtime_flow_run.id) if runtime_flow_run.id else None
    root = root_of(store, task_)
    previous = store.runs(task_.id)
    attempt = max((run.attempt for run in previous), default=0)
    # An attempt a crashed flow run left unfinished: watch it again rather than start a duplicate.
    unfinished = [run for run in previous if run.finished_at is None and run.backend == runner.name]
    used = 0
    # What the next attempt changes from the task's own (the retry policy raised its memory or timeout).
    resources: Resources | None = None
    timeout: int | None = None
    while True:
        used += 1
        if unfinished:
            run = unfinished.pop()
            assert run.id is not None
            handle, run_id = handle_of(run), run.id
            taken_over = take_over(runner, handle)
            if taken_over is None:
                logger.info("reattaching to attempt %d of task %s (%s)", run.attempt, task_.id, handle.name)
                outcome = wait_or_stop(runner, store, handle, run_id, settings)
            else:
                logger.warning("attempt %d of task %s: %s", run.attempt, task_.id, taken_over.message)
                outcome = taken_over
        else:
            attempt += 1
            ctx = RunContext(flow_run_id=flow_run_id, attempt=attempt, root_task_id=root,
                             has_children=bool(store.children(task_.id)), resources=resources,
                             timeout_seconds=timeout)
            handle, run_id = launch_agent(runner, store, task_, ctx)
            outcome = wait_or_stop(runner, store, handle, run_id, settings)
        collected = collect_artifacts(runner, handle, settings)
        decision = decide(Ended(status=outcome.status, reason=outcome.reason, retryable=outcome.retryable,
                                attempt=handle.attempt, used=used, resources=handle.resources,
                                timeout_seconds=handle.timeout_seconds), settings)
        tell_decision(store, handle, decision)
        if decision.retry:
            # This attempt is over; the task lives on into the next one: as this one was, with what changed.
            store.update_run(run_id, status=TaskStatus.FAILED.value, exit_code=outcome.exit_code,
                             reason=outcome.reason, message=outcome.message, finished_at=datetime.now(UTC),
                             artifacts_note=collected.note())
            resources = overlay(handle.resources, decision.resources)
            timeout = decision.timeout_seconds or handle.timeout_seconds
            delay = 0 if unfinished else decision.delay  # the next one is already there: reattach at once
            logger.warning("attempt %d failed (%s: %s); attempt %d in %ds",
                           handle.attempt, outcome.reason, outcome.message, attempt + 1, delay)
            set_status_quietly(store, task_.id, TaskStatus.RETRYING,
                               f"attempt {handle.attempt} failed: {outcome.message}")
            time.sleep(delay)
            continue
        try:
            result = record_run(store, run_id, task_, outcome, collected)
        except OperationalError as exc:  # still unavailable after record-run's retries: fail loudly
            return unrecorded(task_, handle, outcome, collected, exc)
        deleted = release_volume(store, runner, settings, task_, root)
        if deleted is not None:
            logger.info("task tree %s is done: its volume %s was deleted", root, deleted)
        return result


RETRY_LOG_SOURCE = "keruta-prefect/retry"  # the retry policy's lines in the task's log, one per attempt


def tell_decision(store: Store, handle: RunHandle, decision: Decision) -> None:
    """The retry policy's line ("attempt 1 OOMKilled at 256Mi → attempt 2 with 512Mi"), if it has one: in the
    flow run's log and the task's own (stored once per attempt, so a rerun of the flow does not repeat it)."""
    if decision.line is None:
        return
    get_run_logger().warning("%s", decision.line)
    try:
        store.add_logs(handle.task_id, RETRY_LOG_SOURCE,
                       [LogLine(seq=handle.attempt, level="WARNING", message=decision.line)])
    except Exception as exc:  # the flow run's log has it; the attempt goes on regardless
        get_run_logger().warning("the retry line of task %s was not stored: %s", handle.task_id, exception_line(exc))


def take_over(runner: Backend, handle: RunHandle) -> Outcome | None:
    """An unfinished attempt a flow run left behind: None when this flow can follow it (reattach);
    otherwise the attempt's outcome, LOST (a system failure, worth a new attempt): its agent is gone, or
    it cannot report to this process and was stopped, so the script never runs twice at once."""
    if not runner.exists(handle):
        return Outcome(status=TaskStatus.FAILED, reason=Reason.LOST, retryable=True,
                       message="the attempt's agent was gone when the flow came back to it")
    if runner.can_reattach(handle):
        return None
    left = runner.cancel(handle)
    return Outcome(status=TaskStatus.FAILED, reason=Reason.LOST, retryable=True,
                   message="its agent was left running by a flow process that ended and could not report to "
                           "this one, so it was stopped" + (f" ({left})" if left else ""))


def wait_or_stop(runner: Backend, store: Store, handle: RunHandle, run_id: int, settings: KerutaSettings) -> Outcome:
    """Wait for the attempt's outcome. If the wait itself fails, the agent is stopped (never left behind
    unwatched) and what happened is the outcome: a backend that could not follow the attempt is FAILED
    with its reason, not CANCELLED. A cancel or interrupt of the flow run stops the agent, marks it
    CANCELLED and goes on up."""
    try:
        return wait_for_agent(runner, store, handle, settings.prefect_log_max_lines)
    except Exception as exc:
        followed = isinstance(exc, BackendError | TransientBackendError)
        reason = Reason.BACKEND_ERROR if followed else Reason.WAIT_FAILED
        get_run_logger().error("waiting for attempt %d of task %s failed; stopping its agent",
                               handle.attempt, handle.task_id, exc_info=not followed)
        _stop_quietly(runner, handle)
        return Outcome(status=TaskStatus.FAILED, reason=reason,
                       message=f"the {runner.name} backend could not follow the attempt: {exception_line(exc)}")
    except BaseException:  # cancelled, crashed or interrupted while waiting: never leave the agent behind
        _stop_quietly(runner, handle)
        mark_cancelled(store, handle.task_id, run_id, "the flow run was cancelled or stopped")
        raise


def _stop_quietly(runner: Backend, handle: RunHandle) -> None:
    try:
        left = runner.cancel(handle)
        if left:
            get_run_logger().warning("stopping attempt %d of task %s: %s", handle.attempt, handle.task_id, left)
    except Exception as exc:
        get_run_logger().error("the agent of attempt %d of task %s could not be stopped: %s", handle.attempt,
                               handle.task_id, exception_line(exc))


def unrecorded(task: Task, handle: RunHandle, outcome: Outcome, collected: CollectResult,
               error: Exception) -> State[Any]:
    """The database could not take the outcome: keep it in Prefect (a JSON artifact on this flow run and
    the Failed state's data) and fail the run with one line saying so."""
    result = TaskResult(task_id=task.id, status=outcome.status, attempt=handle.attempt, backend=handle.backend,
                        exit_code=outcome.exit_code, reason=outcome.reason, message=outcome.message,
                        job_name=handle.name, namespace=handle.namespace, finished_at=datetime.now(UTC),
                        artifacts=collected.files, artifacts_note=collected.note())
    cause = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    key = publish_unrecorded(result)
    text = (f"keruta task {task.id} ended {outcome.status} but the database did not take the result "
            f"({cause}); the outcome is kept in artifact {key}")
    get_run_logger().error("%s", text)
    return Failed(message=text, data=KerutaTaskFailed(result))


