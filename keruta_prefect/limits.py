"""The one bound on running keruta tasks: the Prefect global concurrency limit ``keruta-tasks``.

Every ``keruta-task`` flow run holds one slot of it while its agent runs (launch → wait → collect →
record), however the flow run was started: from the UI, ``prefect deployment run``, a deployment the
dispatcher handed the task to, a pipeline, ``keruta-prefect run`` or another flow. The limit is created
with ``keruta.task.processor.concurrency`` slots if absent; an existing one (edited in the Prefect UI)
is left alone. Slots are leased, so a crashed flow process frees its slot when the lease runs out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

TASKS_LIMIT = "keruta-tasks"

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


@contextmanager
def task_slot(name: str | None, slots: int) -> Iterator[None]:
    """Hold one slot of the global limit ``name`` (created with ``slots`` if absent) for the block;
    waits for a free slot. ``None`` or ``""``: no limit.

    The slot is asked for straight away (one request on the start path of every task); only when the
    server has no such limit is it created, then asked for again."""
    if not name:
        yield
        return
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    with ExitStack() as held:
        try:
            held.enter_context(concurrency(name, occupy=1, strict=True))
        except ConcurrencySlotAcquisitionError:  # no such limit (or a refusal: asked again below, as it was)
            if ensure_concurrency_limit(name, slots):
                log.info("created the Prefect global concurrency limit %r with %d slots", name, slots)
            held.enter_context(concurrency(name, occupy=1, strict=True))
        yield
