"""The Kubernetes backend: each attempt of a keruta task is an agent Job.

launch (jobs.py): create the task tree's PVC (if any) and the Job; a Job of the same task attempt that
already exists is reattached to, anything else named alike is an error. wait (wait.py): the shared
namespace watch (watch.py) feeds the Pods of the Job to `diagnose`; started Pods' logs are followed into
the Prefect run log (follow.py, logs.py); the Job is read only when the Pods cannot tell; wait is
bounded by the Job's own deadline. collect (collect.py, exec mode): tar over exec (exec.py), then release
the holding agent; never raises. cancel (cancel.py): Foreground deletion, then wait (bounded) until the
Pods are gone. Every request to the API server goes through api.py (typed errors, one request helper).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from keruta_prefect.artifacts import CollectResult
from keruta_prefect.backends.base import LogSink, Outcome, RunContext, RunHandle
from keruta_prefect.backends.kubernetes import cancel, collect, jobs, wait
from keruta_prefect.backends.kubernetes.api import kube_error, unreachable
from keruta_prefect.backends.kubernetes.client import api_client
from keruta_prefect.backends.kubernetes.context import BACKEND_NAME, Kube
from keruta_prefect.backends.kubernetes.follow import parse_stamp
from keruta_prefect.backends.kubernetes.watch import DEFAULT_TUNING, WatchTuning
from keruta_prefect.models import Task
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store

api_error = kube_error  # an ApiException as a retryable or a permanent error with one line for a person


class KubernetesBackend:
    name = BACKEND_NAME

    def __init__(self, settings: KerutaSettings, store: Store, *, tuning: WatchTuning | None = None) -> None:
        # BackendError when disabled or unconfigured
        self.kube = Kube.connect(settings, store, api_client(settings), tuning or DEFAULT_TUNING)
        self.settings, self.store, self.tuning = settings, store, self.kube.tuning
        self.api, self.batch, self.core = self.kube.api, self.kube.batch, self.kube.core

    def launch(self, task: Task, ctx: RunContext) -> RunHandle:
        return jobs.launch(self.kube, task, ctx)

    def release_volume(self, task: Task, root_task_id: str) -> str | None:
        """Delete the PersistentVolumeClaim the task tree shares (absent already is fine); its name."""
        return jobs.release_volume(self.kube, task, root_task_id)

    def wait(self, handle: RunHandle, on_log: LogSink | None = None) -> Outcome:
        """Until the attempt's outcome is known: from its Pods (the shared watch), the agent's own report
        when it holds its files for collection, or the Job when the Pods cannot tell.

        Bounded: at the Job's activeDeadlineSeconds plus a margin (``tuning.deadline_margin``) the Job is
        read one last time, and if it still cannot tell, it is deleted and the outcome is FAILED
        (WAIT_DEADLINE). A watch that cannot list the Pods for ``tuning.unsynced_limit`` seconds raises
        TransientBackendError (the flow retries wait). Log followers of containers that keep running
        (the agent holds its files) go on after the return, on their own, until the container ends."""
        return wait.Waiter(self.kube, handle, on_log).run()

    def collect(self, handle: RunHandle, dest: Path) -> CollectResult:
        """exec mode: tar the agent's artifacts directory out of its holding container, then release it.
        Never raises: whatever prevents it is recorded as "artifacts lost: <reason>"; the task's status
        stays as it is."""
        return collect.collect(self.kube, handle, dest)

    def cancel(self, handle: RunHandle) -> str | None:
        """Delete the Job (Foreground: its Pods first) and wait until its Pods are gone.

        None when they are gone; else (after ``tuning.cancel_wait`` seconds) one line naming the Job and
        the Pods still there, also logged as a warning, for the caller to record."""
        return cancel.cancel(self.kube, handle)

    def attempts_of_flow_run(self, flow_run_id: str, namespaces: Iterable[str]) -> list[RunHandle]:
        """The unfinished agent Jobs a flow run created, found by label, in the default namespace and each
        of ``namespaces``; raises only when not one namespace could be listed."""
        return jobs.attempts_of_flow_run(self.kube, flow_run_id, namespaces)

    def exists(self, handle: RunHandle) -> bool:
        job, missing = jobs.read_job(self.kube, handle)
        return not missing and job is not None

    def can_reattach(self, handle: RunHandle) -> bool:
        """A Job's agent reports to the keruta API, not to this process: any process can follow it."""
        return True

    # The parts tests look at directly.
    def _wait_limit(self, handle: RunHandle) -> float:
        return wait.wait_limit(self.kube, handle)

    def _holding_pod(self, handle: RunHandle) -> str | None:
        return collect.holding_pod(self.kube, handle)


__all__ = ["KubernetesBackend", "WatchTuning", "api_error", "parse_stamp", "unreachable"]
