"""The one bound on running keruta tasks: the Prefect global concurrency limit ``keruta-tasks``.

Every ``keruta-task`` flow run holds one slot of it while its agent runs (launch → wait → collect →
record), however the flow run was started: from the UI, ``prefect deployment run``, a deployment the
dispatcher handed the task to, a pipeline, ``keruta-prefect run`` or another flow. The limit is created
with ``keruta.task.processor.concurrency`` slots if absent; an existing one (edited in the Prefect UI)
is left alone. Slots are leased, so a crashed flow process frees its slot when the lease runs out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from keruta_prefect.errors import TransientError
from keruta_prefect.validation import exception_line

TASKS_LIMIT = "keruta-tasks"
PAUSED_POLL = 5.0  # seconds between asks while the limit has no slot at all

log = logging.getLogger("keruta.limits")


def ensure_concurrency_limit(name: str, slots: int) -> bool:
    """Create the global concurrency limit if absent (atomic: the server refuses a second create with
    409). Returns True when this call created it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        except ObjectAlreadyExists:
            return False  # another flow created it a moment ago: theirs stands
    return True


class SlotUnavailable(TransientError):
    """The global limit could not give a slot, for a reason waiting does not cure (one line)."""


@contextmanager
def task_slot(name: str | None, slots: int) -> Iterator[None]:
    """Hold one slot of the global limit ``name`` (created with ``slots`` if absent) for the block;
    waits for a free slot. ``None`` or ``""``: no limit.

    The slot is asked for straight away (one request on the start path of every task); only when the
    server has no such limit is it created, then asked for again. A limit with no slot at all (0: paused
    in the UI) is waited on, said once, until it has one. Anything else raises SlotUnavailable."""
    if not name:
        yield
        return
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    with ExitStack() as held:
        created = paused = False
        while True:
            try:
                held.enter_context(concurrency(name, occupy=1, strict=True))
                break
            except ConcurrencySlotAcquisitionError as exc:
                status = getattr(getattr(exc.__cause__, "response", None), "status_code", None)
                if status == 422:  # "slots requested is greater than the limit": a limit of 0, paused
                    if not paused:
                        _say(f"the Prefect global concurrency limit {name!r} has no slot (0: paused?); "
                             f"waiting until it has one")
                        paused = True
                    time.sleep(PAUSED_POLL)
                    continue
                if exc.__cause__ is None and not created:  # Prefect's "must be created": create it, ask again
                    created = True
                    try:
                        if ensure_concurrency_limit(name, slots):
                            log.info("created the Prefect global concurrency limit %r with %d slots", name, slots)
                    except Exception as failure:
                        raise SlotUnavailable(f"concurrency_limit={name!r}: the limit could not be created: "
                                              f"{exception_line(failure)}") from None
                    continue
                raise SlotUnavailable(f"concurrency_limit={name!r}: no slot could be taken: "
                                      f"{exception_line(exc.__cause__ or exc)}") from None
        if paused:
            _say(f"the Prefect global concurrency limit {name!r} has a slot again")
        yield


def _say(message: str) -> None:
    """To the flow run's log (shown in the Prefect UI) when there is one, else to keruta's."""
    try:
        from prefect import get_run_logger

        get_run_logger().warning("%s", message)
    except Exception:
        log.warning("%s", message)
