"""Claims: which flow run is to run a PENDING task, so that no task runs twice.

A claim is a compare-and-set of the task's ``claimed_by`` in the database (Store.claim). Its holder is a
Prefect flow run. A claim is taken over when its holder can no longer run the task:
- the holder's flow run ended, or Prefect does not know it (a crashed dispatcher);
- the holder's flow run is stuck in Running: its process died without Prefect noticing, so its lease
  (renewed every ``CLAIM_LEASE / 3`` by :class:`ClaimLease` while the flow run works) has expired.
A holder that is Scheduled or Pending (a keruta-task run the dispatcher handed the task to, waiting for
a worker) keeps its claim however long it waits: it renews from the moment it runs.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import UTC, datetime, timedelta
from types import TracebackType

from prefect.client.schemas.objects import FlowRun, StateType
from prefect.runtime import flow_run as runtime_flow_run

from keruta_prefect.errors import PermanentError
from keruta_prefect.models import Task, TaskStatus
from keruta_prefect.store import Store

CLAIM_LEASE = timedelta(minutes=5)

log = logging.getLogger("keruta.claims")


class TaskClaimed(PermanentError, RuntimeError):
    """Another live flow run holds the task: it runs it (never two at once)."""

    def __init__(self, task_id: str, holder: str) -> None:
        super().__init__(f"task {task_id!r} is claimed by flow run {holder}, which is still running; "
                         "cancel that flow run to run the task here")
        self.task_id, self.holder = task_id, holder


def holder_state(flow_run_id: str) -> str | None:
    """The Prefect state type of a holder's flow run ("RUNNING", "SCHEDULED"…); None if it is unknown."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        run_id = uuid.UUID(flow_run_id)
    except ValueError:
        return None
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)
        except ObjectNotFound:
            return None
    return state_type(run)


def state_type(run: FlowRun) -> str | None:
    """A flow run's Prefect state type, as claims and the reconciler judge it: None for one without a state
    (it never started, so it holds and owns nothing), as for one Prefect does not know."""
    return run.state.type.value if run.state is not None else None


FINAL_STATES = {state.value for state in (StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED,
                                          StateType.CRASHED)}


def holds(state: str | None, lease_expires: datetime | None, now: datetime) -> bool:
    """Does a holder in Prefect state ``state`` with this lease still hold its claim? (pure)"""
    if state is None or state in FINAL_STATES:
        return False
    stuck = state == "RUNNING" and lease_expires is not None and lease_expires < now  # stopped renewing
    return not stuck


def holder_alive(store: Store, holder: str) -> bool:
    """Can ``holder`` still run the tasks it claimed (see the module's rules)?"""
    return holds(holder_state(holder), store.lease_of(holder), datetime.now(UTC))


def claim_owner() -> str:
    """Who claims tasks from here: the current flow run (a process-unique name outside one)."""
    return str(runtime_flow_run.id) if runtime_flow_run.id else f"process-{uuid.uuid4()}"


def claim_task(store: Store, task_id: str, owner: str, handed_over_by: str | None = None) -> Task:
    """Make ``owner`` the one flow run that runs this task, atomically (see Store.claim).

    A FAILED/CANCELLED task is queued again. A claim its holder can no longer use (see the module) is
    taken over; one held by a live flow run raises TaskClaimed. A task that is no longer PENDING
    (IN_PROGRESS from a crashed run, COMPLETED) is returned as it is."""
    replacing: tuple[str | None, ...] = (None, handed_over_by)
    for _ in range(3):
        claimed = store.claim(task_id, owner, replacing=replacing, requeue=True, lease=CLAIM_LEASE)
        if claimed is not None:
            return claimed
        current = store.get_task(task_id)
        holder = store.claim_of(task_id)
        if current.status != TaskStatus.PENDING:
            return current
        if holder and holder_alive(store, holder):
            raise TaskClaimed(task_id, holder)
        replacing = (None, handed_over_by, holder)
    raise TaskClaimed(task_id, store.claim_of(task_id) or "?")


class ClaimLease:
    """While a flow run works, renew the lease on every claim it holds (one row per holder), so that a
    process that dies with its flow run stuck in Running loses its claims after CLAIM_LEASE."""

    def __init__(self, store: Store, owner: str, lease: timedelta = CLAIM_LEASE) -> None:
        self.store, self.owner, self.lease = store, owner, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"keruta-lease-{owner[:8]}", daemon=True)

    def _run(self) -> None:
        interval = self.lease.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                self.store.renew_lease(self.owner, self.lease)
            except Exception as exc:  # a database hiccup: the next round tries again; the lease has room
                log.warning("the claim lease of %s was not renewed: %s", self.owner, exc)

    def __enter__(self) -> ClaimLease:
        self.store.renew_lease(self.owner, self.lease)
        self._thread.start()
        return self

    def __exit__(self, _type: type[BaseException] | None, _exc: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)


def claim_pending_tasks(store: Store, owner: str, limit: int) -> list[str]:
    """Claim up to ``limit`` PENDING tasks for ``owner``, highest priority first. A claim is a
    compare-and-set in the database, so of two dispatchers racing for a task exactly one gets it; a claim
    left by a flow run that ended (a crashed dispatcher) is taken over."""
    claimed: list[str] = []
    alive: dict[str, bool] = {}
    for found, holder in store.pending(limit * 4 + 20):
        if len(claimed) >= limit:
            break
        if holder is not None and holder != owner:
            if holder not in alive:
                alive[holder] = holder_alive(store, holder)
            if alive[holder]:
                continue
        if store.claim(found.id, owner, replacing=(None, holder), lease=CLAIM_LEASE) is not None:
            claimed.append(found.id)
    return claimed


def pass_claim(store: Store, task_id: str, owner: str, new_owner: str) -> None:
    """``owner`` hands its claim on ``task_id`` to ``new_owner`` (the flow run that will run it). If that
    flow run has taken it already, nothing changes."""
    store.claim(task_id, new_owner, replacing=(owner,), lease=CLAIM_LEASE)
