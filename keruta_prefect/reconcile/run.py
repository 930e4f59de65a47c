"""One reconcile pass: gather the facts, plan (pure, plan.py), carry the plan out (unless a dry run), report.

Each action is carried out on its own: one that fails is reported with its error and the others go on.
Kubernetes objects are deleted with the uid they were listed with as a precondition (one recreated under the
name since is left alone); a lost task is changed only if it is still what it was seen as.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from keruta_prefect.backends.base import BackendError, RunHandle
from keruta_prefect.backends.local import LocalBackend
from keruta_prefect.contract import Reason, TaskStatus
from keruta_prefect.models import InvalidTransition
from keruta_prefect.reconcile.facts import Gatherer, live_task_flow_runs, named_task
from keruta_prefect.reconcile.plan import LOST_STATUSES, Action, plan
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import LogLine, Store
from keruta_prefect.validation import exception_line

if TYPE_CHECKING:
    from keruta_prefect.backends.kubernetes.context import Kube

LOG_SOURCE = "keruta-reconcile"


class ActionResult(Action):
    outcome: Literal["planned", "done", "skipped", "failed"] = "planned"
    detail: str | None = None


class ReconcileReport(BaseModel):
    """What one pass found and did (``--json`` prints it; the flow publishes it as a table)."""

    dry_run: bool
    started_at: datetime
    namespaces: list[str] = Field(default_factory=list)  # the namespaces whose objects were looked at
    looked_at: dict[str, int] = Field(default_factory=dict)  # how many of each were seen
    actions: list[ActionResult] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    @property
    def failed(self) -> list[ActionResult]:
        return [a for a in self.actions if a.outcome == "failed"]

    def rows(self) -> list[dict[str, str]]:
        return [{"action": a.kind, "namespace": a.namespace or "", "name": a.name, "outcome": a.outcome,
                 "why": a.why + (f" — {a.detail}" if a.detail else "")} for a in self.actions]

    def lines(self) -> list[str]:
        head = "would do" if self.dry_run else "did"
        seen = ", ".join(f"{count} {what}" for what, count in self.looked_at.items())
        out = [f"keruta-reconcile ({'dry run' if self.dry_run else 'for real'}): looked at {seen}; "
               f"namespaces {', '.join(self.namespaces) or '(none)'}"]
        if self.actions:
            width = max(len(a.kind) for a in self.actions)
            out += [f"{a.outcome:8} {a.kind:{width}} {(a.namespace + '/') if a.namespace else ''}{a.name}: {a.why}"
                    + (f" — {a.detail}" if a.detail else "") for a in self.actions]
        out.append(f"{head}: {len(self.actions)} actions" + (f", {len(self.failed)} failed" if self.failed else ""))
        out += [f"warning: {w}" for w in self.warnings]
        return out


def connect(settings: KerutaSettings, store: Store) -> tuple[Kube | None, str | None]:
    """The cluster, or None and why not (disabled, no connection configured)."""
    if not settings.enabled:
        return None, None
    try:
        from keruta_prefect.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(settings, store).kube, None
    except BackendError as exc:
        return None, f"Kubernetes was not looked at: {exception_line(exc)}"


def reconcile(settings: KerutaSettings, store: Store, *, dry_run: bool = False,
              now: datetime | None = None) -> ReconcileReport:
    """One pass: the facts, the plan, and (unless ``dry_run``) the plan carried out."""
    started = datetime.now(UTC)
    kube, why_not = connect(settings, store)
    gatherer = Gatherer(settings, store, kube, now or started)
    facts = gatherer.gather()
    report = ReconcileReport(dry_run=dry_run, started_at=started, namespaces=sorted(facts.kube_checked),
                             warnings=[w for w in (why_not, *gatherer.warnings) if w])
    report.looked_at = {"Kubernetes objects": len(facts.objects), "tasks": len(facts.tasks),
                        "unfinished attempts": len(facts.runs), "local agents": len(facts.agents),
                        "work directories": len(facts.work_dirs)}
    executor = Executor(settings, store, kube)
    for action in plan(facts):
        result = ActionResult(**action.model_dump())
        if not dry_run:
            executor.run(result)
        report.actions.append(result)
    return report


class Executor:
    """Carries out one action at a time, recording its outcome on it."""

    def __init__(self, settings: KerutaSettings, store: Store, kube: Kube | None) -> None:
        self.settings, self.store, self.kube = settings, store, kube
        self._runners: dict[str, str] | None = None

    def run(self, action: ActionResult) -> None:
        try:
            detail = getattr(self, action.kind.replace("-", "_"))(action)
        except Exception as exc:  # reported with the action; the others go on
            action.outcome, action.detail = "failed", exception_line(exc)
            return
        action.outcome = "skipped" if detail and detail.startswith("skipped: ") else "done"
        action.detail = detail.removeprefix("skipped: ") if detail else None

    def _kube(self) -> Kube:
        if self.kube is None:  # pragma: no cover - a Kubernetes action is planned only from listed objects
            raise BackendError("no cluster connection")
        return self.kube

    def delete_job(self, action: ActionResult) -> str | None:
        from keruta_prefect.backends.kubernetes.jobs import delete_job

        handle = RunHandle(backend="kubernetes", task_id=action.task_id or "", attempt=action.attempt or 1,
                           name=action.name, namespace=action.namespace)
        delete_job(self._kube(), handle, "Foreground", what=f"delete Job {action.name}", uid=action.uid)
        return None

    def delete_pod(self, action: ActionResult) -> str | None:
        from keruta_prefect.backends.kubernetes.jobs import delete_pod

        delete_pod(self._kube(), action.namespace or "", action.name, action.uid)
        return None

    def delete_pvc(self, action: ActionResult) -> str | None:
        from keruta_prefect.backends.kubernetes.jobs import delete_pvc

        delete_pvc(self._kube(), action.namespace or "", action.name, action.uid)
        return None

    def stop_agent(self, action: ActionResult) -> str | None:
        handle = RunHandle(backend="local", task_id=action.task_id or "", attempt=action.attempt or 1,
                           name=action.name, pid=action.pid)
        return LocalBackend(self.settings, self.store).cancel(handle)

    def remove_work_dir(self, action: ActionResult) -> str | None:
        path = Path(action.name)
        shutil.rmtree(path)
        try:
            path.parent.rmdir()  # the task's directory, once its last attempt is gone
        except OSError:
            pass
        return None

    def release_claim(self, action: ActionResult) -> str | None:
        if not self.store.release_claim(action.name, action.holder or ""):
            return "skipped: the claim changed since it was looked at"
        return None

    def fail_lost_task(self, action: ActionResult) -> str | None:
        return self._lost(action, requeue=False)

    def requeue_lost_task(self, action: ActionResult) -> str | None:
        return self._lost(action, requeue=True)

    def _lost(self, action: ActionResult, *, requeue: bool) -> str | None:
        task = self.store.get_task(action.name)
        if task.status not in LOST_STATUSES:
            return f"skipped: the task is {task.status} now"
        if (holder := self.store.claim_of(task.id)) != action.holder:
            return f"skipped: flow run {holder} has claimed it since"
        if runner := self._live_runners().get(task.id):
            return f"skipped: flow run {runner} runs it now"
        message = f"the reconciler found the task LOST: {action.why}"
        now = datetime.now(UTC)
        try:
            if requeue:
                if task.status == TaskStatus.IN_PROGRESS:
                    self.store.set_status(task.id, TaskStatus.RETRYING, message=message, error_code=Reason.LOST)
                self.store.set_status(task.id, TaskStatus.PENDING, message=message)
            else:
                self.store.set_status(task.id, TaskStatus.FAILED, message=message, error_code=Reason.LOST)
        except InvalidTransition as exc:  # the agent's final word came in meanwhile: it stands
            return f"skipped: {exc}"
        for run_id in action.run_ids:
            self.store.update_run(run_id, status=TaskStatus.FAILED.value, reason=Reason.LOST, message=message,
                                  finished_at=now)
        seq = int(now.timestamp() * 1000)
        self.store.add_logs(task.id, LOG_SOURCE, [LogLine(seq=seq, level="WARNING", message=message)])
        return None

    def _live_runners(self) -> dict[str, str]:
        """Task → a live keruta-task flow run naming it, read again when the first lost task is acted on (after
        the slower actions): a rerun by id started since the facts were gathered keeps its task."""
        if self._runners is None:
            self._runners = {}
            for run_id, _state, parameters in live_task_flow_runs():
                if task_id := named_task(parameters):
                    self._runners.setdefault(task_id, run_id)
        return self._runners
