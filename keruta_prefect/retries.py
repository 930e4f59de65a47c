"""Retry by failure class: after an attempt ends, one pure decision says whether the task gets a new attempt,
what that attempt changes, and the line that tells a person so.

- a system failure (the fixed table's ``retryable``: agent lost or killed, API unreachable) and an eviction or
  preemption → a new attempt as it was;
- ``OOMKilled`` under a memory limit → a new attempt with the limit (and request) times
  ``keruta.task.retry.oom-memory-factor``, capped by ``keruta.task.retry.max-memory``: one attempt at the cap,
  then the task fails saying the cap was reached. ``OOMKilled`` without a limit is the node running out of
  memory (nothing of the task's to raise): a new attempt as it was, like an eviction;
- ``TIMEOUT`` / ``DeadlineExceeded`` → with ``keruta.task.retry.deadline-factor`` set, a new attempt with the
  timeout times it; off by default (a script that overran usually overruns again);
- everything else (the script's exit, image pull, configuration) → the task ends with the outcome.

Every new attempt counts toward ``keruta.task.max-attempts``. Quantities are computed exactly (Decimal):
``256Mi`` × 2 is ``512Mi``, ``1Gi`` × 1.5 is ``1536Mi``, ``500M`` × 2 is ``1G``. They are read by
validation.quantity_amount, the one reading of quantities (the Kubernetes client's ``parse_quantity`` would
do, but importing it costs a flow on the local backend 0.6 s, and it has no formatting in the unit family of
the input).
"""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, Decimal
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from keruta_prefect.backoff import attempt_delay
from keruta_prefect.contract import Reason, TaskStatus
from keruta_prefect.models import MAX_TIMEOUT, Resources
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.validation import BINARY_UNITS, DECIMAL_UNITS, quantity_amount, quantity_suffix

OOM_FACTOR_KEY = "keruta.task.retry.oom-memory-factor"
MAX_MEMORY_KEY = "keruta.task.retry.max-memory"
DEADLINE_FACTOR_KEY = "keruta.task.retry.deadline-factor"
MAX_ATTEMPTS_KEY = "keruta.task.max-attempts"

# A Pod that was evicted or preempted (its status reason, or a DisruptionTarget condition's): the node's or
# the scheduler's doing, never the task's. The Job replaces such a Pod within its attempt (podFailurePolicy
# Ignore); when one ends an attempt all the same, the attempt is retried as it was.
DISRUPTIONS = frozenset({"Evicted", "Preempted", "PreemptionByScheduler", "EvictionByEvictionAPI",
                         "DeletionByTaintManager", "TerminationByKubelet", "DisruptionTarget"})
DEADLINES = frozenset({Reason.TIMEOUT, Reason.DEADLINE_EXCEEDED})


class Action(StrEnum):
    END = "end"  # no new attempt: the task ends with this attempt's outcome
    RETRY = "retry"  # a new attempt, as this one was
    RETRY_CHANGED = "retry-changed"  # a new attempt with more memory or a longer timeout


class Ended(BaseModel):
    """The attempt that just ended, as the retry policy sees it."""

    model_config = ConfigDict(frozen=True)

    status: TaskStatus
    reason: str | None = None
    retryable: bool = False  # the fixed table's word (contract.outcome_from_exit, a backend's diagnosis)
    attempt: int = 1  # its number
    used: int = 1  # attempts this run of the task has used, this one included (toward max-attempts)
    resources: Resources | None = None  # the requests and limits it ran with (RunHandle.resources)
    timeout_seconds: int | None = None  # the timeout it ran with


class Decision(BaseModel):
    """What happens after an attempt: ``line`` says it to a person (None: the outcome just stands)."""

    model_config = ConfigDict(frozen=True)

    action: Action
    line: str | None = None
    resources: Resources | None = None  # RETRY_CHANGED: the fields the next attempt changes
    timeout_seconds: int | None = None  # RETRY_CHANGED: the next attempt's timeout
    delay: float = 0.0  # seconds before the next attempt

    @property
    def retry(self) -> bool:
        return self.action != Action.END


def decide(ended: Ended, settings: KerutaSettings) -> Decision:
    """After ``ended``: the task ends, or a new attempt (as it was, or changed). Pure."""
    if ended.status != TaskStatus.FAILED:
        return Decision(action=Action.END)
    name = f"attempt {ended.attempt} {ended.reason or ended.status.value}"
    if ended.reason == Reason.OOM_KILLED:
        wanted = _after_oom(ended, settings, name)
    elif ended.reason in DEADLINES:
        wanted = _after_deadline(ended, settings, name)
    elif ended.retryable or ended.reason in DISRUPTIONS:
        wanted = Decision(action=Action.RETRY, line=f"{name} → attempt {ended.attempt + 1} unchanged")
    else:
        return Decision(action=Action.END)  # the script's own failure, configuration, image pull: never
    if not wanted.retry:
        return wanted
    if ended.used >= settings.task_max_attempts:
        happened = (wanted.line or name).split(" → ")[0]
        return Decision(action=Action.END,
                        line=f"{happened}: not retried, {MAX_ATTEMPTS_KEY}={settings.task_max_attempts} used up")
    delay = 0.0 if ended.reason == Reason.LOST else attempt_delay(ended.used)  # LOST: nothing runs any more
    return wanted.model_copy(update={"delay": delay})


def _after_oom(ended: Ended, settings: KerutaSettings, name: str) -> Decision:
    given = ended.resources or Resources()
    if given.memory_limit is None:
        # No limit of its own: the kernel killed it for the node (memory pressure), as an eviction would.
        return Decision(action=Action.RETRY, line=f"{name} without a memory limit (the node ran out of memory) → "
                                                  f"attempt {ended.attempt + 1} unchanged")
    at = f"{name} at {given.memory_limit}"
    factor = settings.task_retry_oom_memory_factor
    if factor == "off":
        return Decision(action=Action.END, line=f"{at}: not retried ({OOM_FACTOR_KEY}=off)")
    cap_text = settings.task_retry_max_memory
    cap, limit = memory_bytes(cap_text), memory_bytes(given.memory_limit)
    if limit >= cap:
        return Decision(action=Action.END, line=f"{at}: not retried, the cap {MAX_MEMORY_KEY}={cap_text} was reached")
    new_limit = scale_memory(given.memory_limit, factor)
    notes = []
    if memory_bytes(new_limit) > cap:
        new_limit = cap_text
        notes.append(f"capped by {MAX_MEMORY_KEY}={cap_text}")
    changes = Resources(memory_limit=new_limit)
    if given.memory_request is not None:
        new_request = scale_memory(given.memory_request, factor)
        if memory_bytes(new_request) > memory_bytes(new_limit):
            new_request = new_limit  # Kubernetes refuses a request above its limit
        changes = changes.model_copy(update={"memory_request": new_request})
        if not (given.memory_request == given.memory_limit and new_request == new_limit):
            notes.append(f"request {given.memory_request} → {new_request}")
    more = f" ({'; '.join(notes)})" if notes else ""
    return Decision(action=Action.RETRY_CHANGED, resources=changes,
                    line=f"{at} → attempt {ended.attempt + 1} with {new_limit}{more}")


def _after_deadline(ended: Ended, settings: KerutaSettings, name: str) -> Decision:
    factor = settings.task_retry_deadline_factor
    if factor == "off" or ended.timeout_seconds is None:
        return Decision(action=Action.END)  # today's: a script that ran too long fails
    at = f"{name} after {ended.timeout_seconds}s"
    if ended.timeout_seconds >= MAX_TIMEOUT:
        return Decision(action=Action.END, line=f"{at}: not retried, the longest timeout ({MAX_TIMEOUT}s) was reached")
    new = min(math.ceil(ended.timeout_seconds * factor), MAX_TIMEOUT)
    return Decision(action=Action.RETRY_CHANGED, timeout_seconds=new,
                    line=f"{at} → attempt {ended.attempt + 1} with a timeout of {new}s")


# --- memory quantities ------------------------------------------------------------------------------

def memory_bytes(quantity: str) -> Decimal:
    """A memory quantity in bytes, exactly ("256Mi", "1.5G", "1000", "500m" = half a byte)."""
    try:
        return quantity_amount(quantity)
    except ValueError:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity such as 128Mi, 1Gi, 500M or 1048576") from None


def scale_memory(quantity: str, factor: float) -> str:
    """``quantity`` × ``factor``, rounded up (to a whole Mi or M from 1 Mi up, else to a byte) and written in
    its own family of units: 256Mi × 2 = 512Mi, 1Gi × 1.5 = 1536Mi, 500M × 2 = 1G, 1000 × 1.5 = 1500."""
    decimal = quantity_suffix(quantity) in DECIMAL_UNITS
    amount = memory_bytes(quantity) * Decimal(str(factor))
    step = Decimal(10**6 if decimal else 2**20)
    if amount < step:
        step = Decimal(1)
    whole = int((amount / step).to_integral_value(rounding=ROUND_CEILING) * step)
    return format_memory(whole, decimal=decimal)


def format_memory(amount: int, *, decimal: bool = False) -> str:
    """Bytes in the largest unit of the family that divides them exactly (plain bytes when none does)."""
    units = DECIMAL_UNITS if decimal else BINARY_UNITS
    for suffix, size in sorted(units.items(), key=lambda item: -item[1]):
        if amount and amount % size == 0:
            return f"{amount // size}{suffix}"
    return str(amount)
