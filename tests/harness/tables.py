"""Server-side printing: `kubectl get` asks for a `meta.k8s.io/v1` Table (Accept: `application/json;as=Table;
v=v1;g=meta.k8s.io`), and the API server answers with the columns of its printers
(k8s.io/kubernetes/pkg/printers/internalversion): Pods as NAME READY STATUS RESTARTS AGE (wide: IP, NODE,
NOMINATED NODE, READINESS GATES), Jobs as NAME STATUS COMPLETIONS DURATION AGE (wide: CONTAINERS, IMAGES,
SELECTOR), and so on; kinds without a printer of their own get NAME and CREATED AT."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

TABLE = re.compile(r"as=Table;\s*v=(v1|v1beta1);\s*g=meta\.k8s\.io")
Column = tuple[str, str, int]  # name, type, priority (1: only with -o wide)
NAME: Column = ("Name", "string", 0)
AGE: Column = ("Age", "string", 0)


def wants_table(accept: str) -> str | None:
    """The Table version the client asks for first (None: it wants the objects themselves)."""
    for part in accept.split(","):
        match = TABLE.search(part)
        if match:
            return match[1]
        if part.strip().startswith("application/json"):
            return None
    return None


def _parse(stamp: str | None) -> datetime | None:
    if not stamp:
        return None
    return datetime.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(seconds)
    if s < 0:
        return "<invalid>"
    if s < 60 * 2:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    return f"{hours // 24 // 365}y{hours // 24 % 365}d"


def age(obj: dict[str, Any]) -> str:
    created = _parse((obj.get("metadata") or {}).get("creationTimestamp"))
    return "<unknown>" if created is None else human_duration((datetime.now(UTC) - created).total_seconds())


def _pod_row(pod: dict[str, Any]) -> list[Any]:
    status = pod.get("status") or {}
    containers = (pod.get("spec") or {}).get("containers") or []
    statuses = status.get("containerStatuses") or []
    reason = status.get("reason") or status.get("phase") or "Pending"
    inits = status.get("initContainerStatuses") or []
    for index, init in enumerate(inits):  # an init container that is not done shows first
        state = init.get("state") or {}
        terminated, waiting = state.get("terminated"), state.get("waiting") or {}
        if terminated is not None and terminated.get("exitCode") == 0:
            continue
        if terminated is not None:
            reason = f"Init:{terminated.get('reason') or 'ExitCode:' + str(terminated.get('exitCode'))}"
        elif waiting.get("reason") not in (None, "PodInitializing"):
            reason = f"Init:{waiting['reason']}"
        else:
            reason = f"Init:{index}/{len(inits)}"
        break
    else:
        for container in reversed(statuses):
            state = container.get("state") or {}
            if (state.get("waiting") or {}).get("reason"):
                reason = state["waiting"]["reason"]
            elif (state.get("terminated") or {}).get("reason"):
                reason = state["terminated"]["reason"]
            elif "terminated" in state:
                reason = f"ExitCode:{state['terminated'].get('exitCode', 0)}"
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        reason = "Terminating"
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount") or 0) for c in statuses)
    return [f"{ready}/{len(containers)}", reason, restarts, age(pod), status.get("podIP") or "<none>",
            (pod.get("spec") or {}).get("nodeName") or "<none>", "<none>", "<none>"]


def _job_row(job: dict[str, Any]) -> list[Any]:
    spec, status = job.get("spec") or {}, job.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    state = ("Complete" if conditions.get("Complete") == "True" else "Failed" if conditions.get("Failed") == "True"
             else "FailureTarget" if conditions.get("FailureTarget") == "True"
             else "SuccessCriteriaMet" if conditions.get("SuccessCriteriaMet") == "True"
             else "Suspended" if spec.get("suspend") else "Running")
    completions = spec.get("completions")
    done = status.get("succeeded") or 0
    started, ended = _parse(status.get("startTime")), _parse(status.get("completionTime"))
    duration = "" if started is None else human_duration(((ended or datetime.now(UTC)) - started).total_seconds())
    pod_spec = ((spec.get("template") or {}).get("spec")) or {}
    selector = ",".join(f"{k}={v}" for k, v in ((spec.get("selector") or {}).get("matchLabels") or {}).items())
    return [state, f"{done}/{completions if completions is not None else 1}", duration, age(job),
            ",".join(c["name"] for c in pod_spec.get("containers") or []),
            ",".join(c.get("image", "") for c in pod_spec.get("containers") or []), selector or "<none>"]


def _secret_row(secret: dict[str, Any]) -> list[Any]:
    return [secret.get("type") or "Opaque", len(secret.get("data") or {}), age(secret)]


def _namespace_row(namespace: dict[str, Any]) -> list[Any]:
    return [(namespace.get("status") or {}).get("phase") or "Active", age(namespace)]


def _pvc_row(pvc: dict[str, Any]) -> list[Any]:
    spec, status = pvc.get("spec") or {}, pvc.get("status") or {}
    capacity = (status.get("capacity") or {}).get("storage", "")
    return [status.get("phase") or "Pending", spec.get("volumeName") or "", capacity,
            ",".join({"ReadWriteOnce": "RWO", "ReadWriteMany": "RWX", "ReadOnlyMany": "ROX",
                      "ReadWriteOncePod": "RWOP"}.get(m, m) for m in status.get("accessModes") or []),
            spec.get("storageClassName") or "<unset>", "<unset>", age(pvc), "Filesystem"]


PRINTERS: dict[str, tuple[list[Column], Callable[[dict[str, Any]], list[Any]]]] = {
    "pods": ([NAME, ("Ready", "string", 0), ("Status", "string", 0), ("Restarts", "string", 0), AGE,
              ("IP", "string", 1), ("Node", "string", 1), ("Nominated Node", "string", 1),
              ("Readiness Gates", "string", 1)], _pod_row),
    "jobs": ([NAME, ("Status", "string", 0), ("Completions", "string", 0), ("Duration", "string", 0), AGE,
              ("Containers", "string", 1), ("Images", "string", 1), ("Selector", "string", 1)], _job_row),
    "secrets": ([NAME, ("Type", "string", 0), ("Data", "string", 0), AGE], _secret_row),
    "namespaces": ([NAME, ("Status", "string", 0), AGE], _namespace_row),
    "persistentvolumeclaims": ([NAME, ("Status", "string", 0), ("Volume", "string", 0),
                                ("Capacity", "string", 0), ("Access Modes", "string", 0),
                                ("StorageClass", "string", 0), ("VolumeAttributesClass", "string", 0), AGE,
                                ("VolumeMode", "string", 1)], _pvc_row),
}
DEFAULT: tuple[list[Column], Callable[[dict[str, Any]], list[Any]]] = (
    [NAME, ("Created At", "date", 0)], lambda obj: [(obj.get("metadata") or {}).get("creationTimestamp")])


def table(plural: str, objects: list[dict[str, Any]], version: str, resource_version: str,
          columns: bool = True) -> dict[str, Any]:
    """The Table of ``objects``; ``columns=False`` leaves the definitions out (watch events after the first)."""
    definitions, row = PRINTERS.get(plural, DEFAULT)
    rows = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
        rows.append({"cells": [meta.get("name", ""), *row(obj)], "object": partial})
    out: dict[str, Any] = {"kind": "Table", "apiVersion": f"meta.k8s.io/{version}",
                           "metadata": {"resourceVersion": resource_version}, "rows": rows}
    if columns:
        out["columnDefinitions"] = [
            {"name": name, "type": kind, "format": "name" if name == "Name" else "", "description": name,
             "priority": priority} for name, kind, priority in definitions]
    return out
