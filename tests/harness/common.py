"""What every role of the harness cluster shares: the resources it serves, time stamps as the API writes
them, the records of requests, changes and open streams, and Kubernetes' `Status` error bodies."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp.web
import kmock

from .discovery import CATALOGUE

PODS = kmock.resource("", "v1", "pods")
JOBS = kmock.resource("batch", "v1", "jobs")
PVCS = kmock.resource("", "v1", "persistentvolumeclaims")
SECRETS = kmock.resource("", "v1", "secrets")
NAMESPACES = kmock.resource("", "v1", "namespaces")
# Every kind discovery announces (discovery.CATALOGUE) is stored; reviews are answered, never stored.
RESOURCES = tuple(kmock.resource(k.group, k.version, k.plural) for k in CATALOGUE
                  if k.plural != "selfsubjectaccessreviews")
KINDS = {k.plural: k.kind for k in CATALOGUE}


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_timestamp() -> str:
    ns = time.time_ns()
    return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9:09d}Z"


@dataclass(frozen=True)
class Call:
    """One API request, as RBAC sees it."""

    verb: str
    group: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None
    at: float = field(default_factory=time.perf_counter)  # when the API server received it


@dataclass
class Event:
    """One change in the store's history, as a watch sends it."""

    rv: int
    type: str
    resource: str
    namespace: str | None
    obj: dict[str, Any]


@dataclass
class Stream:
    """An open watch or log stream, so faults can reach it."""

    kind: str
    drop: bool = False
    expire: bool = False
    silent: bool = False
    inject: list[bytes] = field(default_factory=list)  # raw lines to send as they are (watch faults)


def status_body(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


def error(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response(status_body(code, reason, message), status=code)


def not_found(resource: kmock.resource, name: str) -> aiohttp.web.Response:
    """The API server's 404 for an object: `jobs.batch "NAME" not found`."""
    group = f".{resource.group}" if resource.group else ""
    return error(404, "NotFound", f'{resource.plural}{group} "{name}" not found')


def namespace_object(name: str) -> dict[str, Any]:
    """A Namespace as the API server stores it (its finalizer and phase defaulted)."""
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def raw_request(request: kmock.Request) -> aiohttp.web.BaseRequest:
    """aiohttp's own request under kmock's (streams, WebSockets and the transport need it)."""
    raw = request._raw_request
    assert raw is not None, "kmock always serves over aiohttp"
    return raw


def container_state(pod: dict[str, Any], container: str) -> dict[str, Any]:
    """The state of a (main or init) container of ``pod``, as its status reports it; {} before any."""
    for key in ("containerStatuses", "initContainerStatuses"):
        for status in (pod.get("status") or {}).get(key) or []:
            if status["name"] == container:
                return status.get("state") or {}
    return {}


class _Objects(Protocol):
    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...


def pod_container(store: _Objects,
                  request: kmock.Request) -> tuple[str, str, dict[str, Any], str] | aiohttp.web.Response:
    """(namespace, pod name, pod, container) a pods/log or pods/exec request names; a 404 if no such Pod."""
    namespace, name = request.namespace or "", request.name or ""
    pod = store.get(PODS, namespace, name)
    if pod is None:
        return error(404, "NotFound", f'pods "{name}" not found')
    return namespace, name, pod, request.params.get("container") or pod["spec"]["containers"][0]["name"]
