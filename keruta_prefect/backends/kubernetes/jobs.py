"""The agent Job and the task tree's PersistentVolumeClaim: create (or reattach), read, delete, find.

Every request goes through :func:`api.request`; an absent object on delete and an existing one on
create are expected (``except NotFound`` / ``except Conflict``), everything else leaves as the typed
error (transient ones are retried by the flow).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import kubernetes.client

from keruta_prefect.backends.base import BackendError, RunHandle
from keruta_prefect.backends.kubernetes.api import Conflict, KubeError, NotFound, request
from keruta_prefect.backends.kubernetes.context import BACKEND_NAME, Kube
from keruta_prefect.manifest import (
    ANNOTATION_TASK,
    LABEL_ATTEMPT,
    LABEL_FLOW_RUN,
    LABEL_TASK,
    SELECTOR,
    attempt_resources,
    attempt_timeout,
    build_job,
    build_pvc,
    label_value,
    namespace_of,
    pvc_name,
)
from keruta_prefect.models import RunContext, Task

log = logging.getLogger("keruta.kubernetes")


def launch(kube: Kube, task: Task, ctx: RunContext) -> RunHandle:
    """Create the task tree's PVC (if any; there already is fine) and the attempt's Job. A Job of this very
    attempt that exists already is reattached to; anything else of that name is a BackendError."""
    namespace = namespace_of(task, kube.settings)
    pvc = build_pvc(task, kube.settings, ctx)
    if pvc is not None:
        ensure_pvc(kube, namespace, pvc)
    job = build_job(task, kube.settings, ctx)
    name = job["metadata"]["name"]
    try:
        # No answer (Unreachable) may still mean created: the retry finds it (Conflict) and reattaches.
        created = request(kube.batch.create_namespaced_job, namespace, job,
                          what=f"create Job {name} in namespace {namespace}")
    except Conflict:
        created = existing_job(kube, namespace, name, task, ctx)
    return RunHandle(backend=BACKEND_NAME, task_id=task.id, attempt=ctx.attempt, flow_run_id=ctx.flow_run_id,
                     name=name, namespace=namespace, uid=created["metadata"].get("uid"),
                     resources=attempt_resources(task, kube.settings, ctx),
                     timeout_seconds=attempt_timeout(task, kube.settings, ctx))


def existing_job(kube: Kube, namespace: str, name: str, task: Task, ctx: RunContext) -> dict[str, Any]:
    """The Job already there: this very attempt (reattach), or a clear error."""
    existing = request(kube.batch.read_namespaced_job, name, namespace,
                       what=f"read Job {name} in namespace {namespace}")
    labels = existing["metadata"].get("labels") or {}
    if labels.get(LABEL_TASK) == label_value(task.id) and labels.get(LABEL_ATTEMPT) == str(ctx.attempt):
        log.info("Job %s/%s of this task attempt exists already; reattaching", namespace, name)
        return existing
    raise BackendError(f"a Job named {name} already exists in namespace {namespace} and is not attempt "
                       f"{ctx.attempt} of task {task.id}; delete it or rename the task")


def ensure_pvc(kube: Kube, namespace: str, pvc: dict[str, Any]) -> None:
    name = pvc["metadata"]["name"]
    try:
        request(kube.core.create_namespaced_persistent_volume_claim, namespace, pvc,
                what=f"create PersistentVolumeClaim {name} in namespace {namespace}")
    except Conflict:
        pass  # already there: the task tree's volume, created by an earlier task of the tree


def release_volume(kube: Kube, task: Task, root_task_id: str) -> str:
    """Delete the PersistentVolumeClaim the task tree shares (absent already is fine); its name."""
    name = pvc_name(root_task_id)
    delete_pvc(kube, namespace_of(task, kube.settings), name)
    return name


def delete_pvc(kube: Kube, namespace: str, name: str, uid: str | None = None) -> None:
    """Delete a PersistentVolumeClaim (only the one of ``uid``, if given); absent already is fine."""
    try:
        request(kube.core.delete_namespaced_persistent_volume_claim, name, namespace,
                **({"body": _delete_options(uid)} if uid else {}), what=f"delete PersistentVolumeClaim {name}")
    except NotFound:
        pass


def delete_pod(kube: Kube, namespace: str, name: str, uid: str | None = None) -> None:
    """Delete a Pod (only the one of ``uid``, if given); absent already is fine."""
    try:
        request(kube.core.delete_namespaced_pod, name, namespace, body=_delete_options(uid),
                what=f"delete Pod {name} in namespace {namespace}")
    except NotFound:
        pass


def _delete_options(uid: str | None, propagation: str | None = None) -> kubernetes.client.V1DeleteOptions:
    """Delete options; with ``uid``, a precondition: an object recreated under the name since it was read is
    left alone (Conflict)."""
    return kubernetes.client.V1DeleteOptions(
        propagation_policy=propagation,
        preconditions=kubernetes.client.V1Preconditions(uid=uid) if uid else None)


LABELLED_KINDS = ("Job", "Pod", "PersistentVolumeClaim")


def labelled_objects(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    """keruta-prefect's Jobs, Pods and PersistentVolumeClaims in ``namespace`` (by its labels), each with its
    ``kind``; a namespace that does not exist has none."""
    lists = ((kube.batch.list_namespaced_job, "Job"), (kube.core.list_namespaced_pod, "Pod"),
             (kube.core.list_namespaced_persistent_volume_claim, "PersistentVolumeClaim"))
    found: list[dict[str, Any]] = []
    for call, kind in lists:
        try:
            body = request(call, namespace, label_selector=SELECTOR, what=f"list {kind}s in namespace {namespace}")
        except NotFound:
            return []
        found.extend({**item, "kind": kind} for item in body.get("items") or [])
    return found


def read_job(kube: Kube, handle: RunHandle) -> tuple[dict[str, Any] | None, bool]:
    """The attempt's Job, and whether it is known to be missing (404)."""
    try:
        return request(kube.batch.read_namespaced_job, handle.name, handle.namespace or "",
                       what=f"read Job {handle.name}"), False
    except NotFound:
        return None, True


def delete_job(kube: Kube, handle: RunHandle, propagation: Literal["Foreground", "Background"],
               what: str | None = None, uid: str | None = None) -> None:
    """Delete the attempt's Job (and, by ``propagation``, its Pods); absent already is fine. With ``uid``,
    only that Job (one recreated under the name since it was read is left alone: Conflict)."""
    try:
        request(kube.batch.delete_namespaced_job, handle.name, handle.namespace or "",
                body=_delete_options(uid, propagation),
                what=what or f"delete Job {handle.name}")
    except NotFound:
        pass


def attempts_of_flow_run(kube: Kube, flow_run_id: str, namespaces: Iterable[str]) -> list[RunHandle]:
    """The unfinished agent Jobs a flow run created, found by label (no in-memory handle needed), in
    the default namespace and each of ``namespaces``. A namespace that does not exist is skipped; one
    that cannot be listed (forbidden, an API error) is skipped with a warning, so the others still count.
    Raises only when not one namespace could be listed."""
    handles: list[RunHandle] = []
    selector = f"{SELECTOR},{LABEL_FLOW_RUN}={label_value(flow_run_id)}"
    wanted = sorted({n for n in namespaces if n} | {kube.settings.default_namespace})
    failures: list[KubeError] = []
    for namespace in wanted:
        try:
            body = request(kube.batch.list_namespaced_job, namespace, label_selector=selector,
                           what=f"list Jobs of flow run {flow_run_id} in namespace {namespace}")
        except NotFound:
            continue
        except KubeError as failure:
            log.warning("%s; its Jobs are not found", failure)
            failures.append(failure)
            continue
        handles.extend(_handle_of(job, flow_run_id, namespace) for job in body.get("items") or [])
    if failures and len(failures) == len(wanted):
        raise failures[0]
    return handles


def _handle_of(job: dict[str, Any], flow_run_id: str, namespace: str) -> RunHandle:
    meta = job["metadata"]
    return RunHandle(backend=BACKEND_NAME, task_id=(meta.get("annotations") or {}).get(ANNOTATION_TASK, ""),
                     attempt=int((meta.get("labels") or {}).get(LABEL_ATTEMPT, 1)), flow_run_id=flow_run_id,
                     name=meta["name"], namespace=namespace, uid=meta.get("uid"))
