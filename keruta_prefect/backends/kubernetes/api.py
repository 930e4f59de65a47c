"""The one adapter between the Kubernetes backend and the API server: typed errors, one request helper.

Every plain request goes through :func:`request`: the raw answer parsed as JSON here (the client's
models are not built), (connect, read) timeouts so none waits forever, and the failure mapped to a
class by its HTTP status (as kopf's ``errors.check_response`` does). The original exception stays the
``__cause__``; ``str()`` is the one line a person reads. Callers say what they expect::

    try:
        request(core.delete_namespaced_persistent_volume_claim, name, namespace, what=f"delete ... {name}")
    except NotFound:
        pass  # absent already

The classes: :class:`KubeError` is the base; :class:`KubeUnavailable` (0, 408, 429, 500, 502, 503, 504,
and :class:`Unreachable`: no answer at all) is a :class:`TransientBackendError`, worth another try;
every other status is a :class:`KubeRefused`, a :class:`BackendError` — :class:`BadRequest` (400),
:class:`Unauthorized` (401), :class:`Forbidden` (403), :class:`NotFound` (404), :class:`Conflict`
(409), :class:`Gone` (410), :class:`Invalid` (422). Streams (the watch, log following, exec) open their
own connections but map their failures with :func:`translated` / :func:`kube_error` the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from websocket import WebSocketBadStatusException

from keruta_prefect.backends.base import BackendError, TransientBackendError
from keruta_prefect.errors import KerutaError

CONNECT_TIMEOUT = 10.0  # seconds to open a connection to the API server
READ_TIMEOUT = 60.0  # seconds for the answer to a plain request (watches and log streams set their own)
REQUEST_TIMEOUT = (CONNECT_TIMEOUT, READ_TIMEOUT)
# Statuses another try of the same request may get past: no status (the WebSocket client's "could not
# connect"), a timeout, throttling, and the server (or a proxy in front of it) being briefly away.
TRANSIENT_STATUSES = frozenset({0, 408, 429, 500, 502, 503, 504})
# The request got no answer at all: refused, reset, timed out.
TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError)

RBAC_HINT = ("grant the Role in deployments/rbac.yaml to the account keruta-prefect runs as "
             "(keruta-prefect doctor checks every verb)")
NAMESPACE_HINT = "create the namespace or set keruta.kubernetes.default-namespace"


class KubeError(KerutaError):
    """A request to the API server failed. ``str()`` is one line for a person; ``what`` is the request,
    ``status`` the HTTP status (None: no answer), ``reason`` its reason phrase, ``detail`` the message of
    the Status it answered with."""

    def __init__(self, message: str, *, what: str = "", status: int | None = None, reason: str = "",
                 detail: str = "") -> None:
        super().__init__(message)  # the only positional argument: copies (pickle) keep the rest in __dict__
        self.what = what
        self.status = status
        self.reason = reason
        self.detail = detail

    @property
    def answer(self) -> str:
        """What the server said, without the request: "HTTP 500: <detail>" (or why there was no answer)."""
        return f"HTTP {self.status}: {self.detail}"


class KubeUnavailable(KubeError, TransientBackendError):
    """The API server (or what is in front of it) could not answer this time: worth another try."""


class Unreachable(KubeUnavailable):
    """No answer at all (refused, reset, timed out); ``detail`` names the transport error."""

    @property
    def kind(self) -> str:
        """The transport error's class name (e.g. ``MaxRetryError``)."""
        return self.detail.partition(":")[0]

    @property
    def answer(self) -> str:
        return f"no answer from the API server ({self.detail})"


class KubeRefused(KubeError, BackendError):
    """The API server answered with a refusal another try would get again."""


class BadRequest(KubeRefused):
    """400: e.g. the container of a log or exec request is not running (yet, or any more)."""


class Unauthorized(KubeRefused):
    """401: the credentials are not accepted."""


class Forbidden(KubeRefused):
    """403: RBAC does not allow the request."""


class NotFound(KubeRefused):
    """404: the object (or its namespace) does not exist."""


class Conflict(KubeRefused):
    """409: an object of that name exists already."""


class Gone(KubeRefused):
    """410: a watch's resourceVersion is too old; list again."""


class Invalid(KubeRefused):
    """422: the object does not validate."""


_BY_STATUS: dict[int, type[KubeRefused]] = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                            409: Conflict, 410: Gone, 422: Invalid}


def status_of(exc: ApiException) -> int:
    """The HTTP status of a failed request. The WebSocket client (exec) reports every failure to connect
    as status 0; a refused handshake keeps its real status in the exception it was raised from."""
    cause = exc.__cause__ or exc.__context__
    if not exc.status and isinstance(cause, WebSocketBadStatusException):
        return int(cause.status_code)
    return int(exc.status or 0)


def detail_of(exc: ApiException) -> str:
    """The message of the Status object the API server answered with (or the HTTP reason)."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


def kube_error(exc: ApiException, what: str) -> KubeError:
    """The typed error for a failed request (``raise kube_error(exc, what) from exc``), with one line for a
    person: the request, the status, the server's message, and for RBAC and a missing namespace the fix."""
    status, reason, detail = status_of(exc), str(exc.reason or ""), detail_of(exc)
    if status in TRANSIENT_STATUSES:
        return KubeUnavailable(f"{what}: HTTP {status}: {detail}", what=what, status=status, reason=reason,
                               detail=detail)
    cls = _BY_STATUS.get(status, KubeRefused)
    if cls is Forbidden:
        message = f"{what}: forbidden: {detail} — {RBAC_HINT}"
    elif cls is NotFound and "namespaces" in detail:
        message = f"{what}: {detail} — {NAMESPACE_HINT}"
    else:
        message = f"{what}: HTTP {status}: {detail}"
    return cls(message, what=what, status=status, reason=reason, detail=detail)


def unreachable(exc: BaseException, what: str) -> Unreachable:
    """The typed error for a request that got no answer (``raise unreachable(exc, what) from exc``)."""
    detail = f"{type(exc).__name__}: {exc}"
    return Unreachable(f"{what}: no answer from the API server ({detail})", what=what, detail=detail)


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Within: an ApiException or a transport error leaves as the matching :class:`KubeError`."""
    try:
        yield
    except ApiException as exc:
        raise kube_error(exc, what) from exc
    except TRANSPORT_ERRORS as exc:
        raise unreachable(exc, what) from exc


def request(call: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> dict[str, Any]:
    """``call(*args, **kwargs)`` (a bound method of the generated client) with the raw answer parsed as
    JSON and the timeouts; its failure as a :class:`KubeError` saying ``what`` failed."""
    with translated(what):
        response = call(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        data = response.data
    try:
        found = json.loads(data) if data else {}
    except ValueError as exc:  # e.g. a proxy's login page: whatever answered is no Kubernetes API server
        start = bytes(data[:80]).decode("utf-8", "replace").replace("\n", " ")
        raise KubeRefused(f"{what}: the answer is not JSON (not a Kubernetes API server?): {start!r}",
                          what=what, status=int(getattr(response, "status", 0) or 0), detail=start) from exc
    return found if isinstance(found, dict) else {}


def dry_run_create(api: kubernetes.client.ApiClient, document: dict[str, Any], what: str) -> dict[str, Any]:
    """Ask the API server to check a Job or PersistentVolumeClaim as if creating it (server-side dry run:
    admission and validation run, nothing is stored); the object as it would be created."""
    namespace = document["metadata"]["namespace"]
    create: Callable[..., Any]
    if document["kind"] == "Job":
        create = kubernetes.client.BatchV1Api(api).create_namespaced_job
    elif document["kind"] == "PersistentVolumeClaim":
        create = kubernetes.client.CoreV1Api(api).create_namespaced_persistent_volume_claim
    else:
        raise ValueError(f"no dry run for kind {document['kind']!r}")
    return request(create, namespace, document, dry_run="All", what=what)


__all__ = ["REQUEST_TIMEOUT", "BadRequest", "Conflict", "Forbidden", "Gone", "Invalid", "KubeError", "KubeRefused",
           "KubeUnavailable", "NotFound", "Unauthorized", "Unreachable", "detail_of", "dry_run_create", "kube_error",
           "request", "status_of", "translated", "unreachable"]
