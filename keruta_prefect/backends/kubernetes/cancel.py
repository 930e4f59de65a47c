"""cancel(): delete the attempt's Job (Foreground: its Pods first) and wait, bounded, until its Pods are
gone; the log followers that outlived wait() stop."""

from __future__ import annotations

import logging

from keruta_prefect.backends.base import RunHandle
from keruta_prefect.backends.kubernetes.context import Kube
from keruta_prefect.backends.kubernetes.jobs import delete_job
from keruta_prefect.backends.kubernetes.wait import POLL_INTERVAL
from keruta_prefect.backends.kubernetes.watch import WATCH_ENDED, subscribe

log = logging.getLogger("keruta.kubernetes")


def cancel(kube: Kube, handle: RunHandle) -> str | None:
    """None when the Job's Pods are gone; else (after ``tuning.cancel_wait`` seconds) one line naming the
    Job and the Pods still there, also logged as a warning, for the caller to record."""
    assert handle.namespace is not None
    delete_job(kube, handle, "Foreground")
    kube.followers.stop((handle.namespace, handle.name))
    clock = kube.tuning.clock
    subscription = subscribe(kube.api, handle.namespace, kube.tuning, handle.name)
    deadline = clock.now() + kube.tuning.cancel_wait
    try:
        while subscription.pods() or not subscription.synced:
            if clock.now() >= deadline:
                left = sorted(p["metadata"]["name"] for p in subscription.pods())
                message = (f"Job {handle.namespace}/{handle.name} was deleted, but after "
                           f"{kube.tuning.cancel_wait:.0f}s its Pods are still there: "
                           f"{', '.join(left) or '(unknown: the watch cannot list them)'} (a finalizer, or a "
                           "node that does not answer?); Kubernetes removes them when it can")
                log.warning("%s", message)
                return message
            event = subscription.get(timeout=POLL_INTERVAL)
            if not subscription.alive or (event is not None and event[0] == WATCH_ENDED):
                subscription.close()
                subscription = subscribe(kube.api, handle.namespace, kube.tuning, handle.name)
        return None
    finally:
        subscription.close()
