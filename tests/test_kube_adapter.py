"""The Kubernetes adapter (keruta_prefect/backends/kubernetes/api.py): each HTTP status the API server
can answer with becomes its error class (transient or permanent, as the flows retry them), with the
one line a person reads and the original exception as the cause. Through a real HTTP server that
answers with chosen statuses (a tiny http.server: no cluster needed), never a mocked client. The
watch's and the log follower's backoff pauses go through an injectable clock."""

from __future__ import annotations

import json
import pickle
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubernetes.client
import pytest
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from keruta_prefect.backends.base import BackendError, TransientBackendError
from keruta_prefect.backends.kubernetes import api_error
from keruta_prefect.backends.kubernetes.api import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    Invalid,
    KubeError,
    KubeRefused,
    KubeUnavailable,
    NotFound,
    Unauthorized,
    Unreachable,
    dry_run_create,
    request,
)
from keruta_prefect.backends.kubernetes.exec import ArtifactsLost, ContainerGone, exec_command
from keruta_prefect.backends.kubernetes.logs import BACKOFF_CAP, BACKOFF_INITIAL, LogFollower, ResumeCursor
from keruta_prefect.backends.kubernetes.watch import NamespaceWatch, WatchTuning
from keruta_prefect.errors import is_transient


@dataclass
class Answer:
    status: int = 200
    body: dict[str, object] | bytes = field(default_factory=dict)


class StatusServer:
    """Answers every request (plain, or a WebSocket handshake) with ``answer``; records what it was asked."""

    def __init__(self) -> None:
        self.answer = Answer()
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                server.requests.append((self.command, self.path))
                answer = server.answer.body
                body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(server.answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _reply

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def refuse(self, status: int, message: str = "no", reason: str = "Refused") -> None:
        self.answer = Answer(status, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status,
                                      "reason": reason, "message": message})

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[StatusServer]:
    running = StatusServer()
    yield running
    running.stop()


def client_for(url: str, retries: int | None = None) -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    configuration.host = url
    configuration.retries = retries
    return kubernetes.client.ApiClient(configuration)


@pytest.fixture
def api(server: StatusServer) -> Iterator[kubernetes.client.ApiClient]:
    client = client_for(server.url)
    yield client
    client.close()


def read_job(api: kubernetes.client.ApiClient) -> dict[str, object]:
    return request(kubernetes.client.BatchV1Api(api).read_namespaced_job, "j", "default", what="read Job j")


RBAC = ("grant the Role in deployments/rbac.yaml to the account keruta-prefect runs as (keruta-prefect doctor "
        "checks every verb)")
TABLE: list[tuple[int, str, type[KubeError], str]] = [
    (400, "bad", BadRequest, "read Job j: HTTP 400: bad"),
    (401, "who?", Unauthorized, "read Job j: HTTP 401: who?"),
    (403, "jobs is forbidden", Forbidden, f"read Job j: forbidden: jobs is forbidden — {RBAC}"),
    (404, 'jobs.batch "j" not found', NotFound, 'read Job j: HTTP 404: jobs.batch "j" not found'),
    (404, 'namespaces "x" not found', NotFound,
     'read Job j: namespaces "x" not found — create the namespace or set keruta.kubernetes.default-namespace'),
    (409, "exists", Conflict, "read Job j: HTTP 409: exists"),
    (410, "too old", Gone, "read Job j: HTTP 410: too old"),
    (422, "invalid", Invalid, "read Job j: HTTP 422: invalid"),
    (418, "teapot", KubeRefused, "read Job j: HTTP 418: teapot"),
    (501, "not implemented", KubeRefused, "read Job j: HTTP 501: not implemented"),
    (408, "slow", KubeUnavailable, "read Job j: HTTP 408: slow"),
    (429, "slow down", KubeUnavailable, "read Job j: HTTP 429: slow down"),
    (500, "oops", KubeUnavailable, "read Job j: HTTP 500: oops"),
    (502, "bad gateway", KubeUnavailable, "read Job j: HTTP 502: bad gateway"),
    (503, "away", KubeUnavailable, "read Job j: HTTP 503: away"),
    (504, "late", KubeUnavailable, "read Job j: HTTP 504: late"),
]


@pytest.mark.parametrize(("status", "message", "cls", "line"), TABLE)
def test_each_status_is_its_error_class_with_the_line_users_read(
        server: StatusServer, api: kubernetes.client.ApiClient, status: int, message: str, cls: type[KubeError],
        line: str) -> None:
    server.refuse(status, message)
    with pytest.raises(KubeError) as caught:
        read_job(api)
    error = caught.value
    assert type(error) is cls and str(error) == line
    assert (error.status, error.detail, error.what) == (status, message, "read Job j")
    transient = cls is KubeUnavailable
    assert is_transient(error) == transient  # the flows retry exactly these
    assert isinstance(error, TransientBackendError) == transient and isinstance(error, BackendError) != transient
    assert isinstance(error.__cause__, ApiException) and error.__cause__.status == status  # the cause is kept
    # The same mapping under the backend's historical name.
    assert str(api_error(error.__cause__, "read Job j")) == line


def test_no_answer_is_unreachable_and_transient() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = client_for(f"http://127.0.0.1:{port}", retries=0)
    try:
        with pytest.raises(Unreachable) as caught:
            read_job(client)
    finally:
        client.close()
    error = caught.value
    assert is_transient(error) and isinstance(error, TransientBackendError) and error.status is None
    assert str(error).startswith("read Job j: no answer from the API server (")
    assert isinstance(error.__cause__, urllib3.exceptions.HTTPError | OSError)
    assert error.kind == type(error.__cause__).__name__


def test_a_plain_request_returns_the_parsed_answer(server: StatusServer, api: kubernetes.client.ApiClient) -> None:
    server.answer = Answer(200, {"kind": "Job", "metadata": {"name": "j", "uid": "u-1"}})
    assert read_job(api) == {"kind": "Job", "metadata": {"name": "j", "uid": "u-1"}}


def test_an_answer_that_is_not_json_is_one_refusal_quoting_it(
        server: StatusServer, api: kubernetes.client.ApiClient) -> None:
    """E.g. a proxy's login page in front of the API server: one line, permanent, not a JSONDecodeError."""
    from keruta_prefect.backends.kubernetes.api import KubeRefused

    server.answer = Answer(200, b"<html><body>Please log in</body></html>")
    with pytest.raises(KubeRefused) as caught:
        read_job(api)
    line = str(caught.value)
    assert "not JSON" in line and "Please log in" in line and "\n" not in line
    assert not is_transient(caught.value)


def test_the_server_dry_run_asks_for_a_dry_run_and_maps_a_conflict(
        server: StatusServer, api: kubernetes.client.ApiClient) -> None:
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "team-a"}}
    server.answer = Answer(201, job)
    assert dry_run_create(api, job, "check Job j") == job
    assert server.requests[-1][0] == "POST"
    assert server.requests[-1][1].startswith("/apis/batch/v1/namespaces/team-a/jobs?") and "dryRun=All" in \
        server.requests[-1][1]
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "p", "namespace": "team-a"}}
    server.refuse(409, "exists")
    with pytest.raises(Conflict, match=r"^check PVC p: HTTP 409: exists$"):
        dry_run_create(api, pvc, "check PVC p")
    assert server.requests[-1][1].startswith("/api/v1/namespaces/team-a/persistentvolumeclaims?")


def test_copies_of_the_errors_keep_their_class_and_facts(
        server: StatusServer, api: kubernetes.client.ApiClient) -> None:
    """Prefect may keep a failed task's exception; a copy is still the same error."""
    server.refuse(503, "away")
    with pytest.raises(KubeUnavailable) as caught:
        read_job(api)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is KubeUnavailable and str(copy) == str(caught.value)
    assert (copy.status, copy.detail, copy.what) == (503, "away", "read Job j")


@pytest.mark.parametrize(("status", "cls", "text"), [
    (403, ArtifactsLost, "exec into Pod p is forbidden: grant `create` on `pods/exec` (deployments/rbac.yaml), "
                         "or set keruta.artifacts.mode=upload"),
    (404, ContainerGone, "the Pod p is gone (deleted before its files were collected)"),
    (400, ContainerGone, "the agent container of Pod p is not running any more"),
])
def test_a_refused_exec_handshake_is_mapped_by_its_status(
        server: StatusServer, api: kubernetes.client.ApiClient, status: int, cls: type[ArtifactsLost],
        text: str) -> None:
    """The WebSocket client reports a refused handshake as status 0; its real status decides."""
    server.refuse(status, "refused")
    with pytest.raises(ArtifactsLost) as caught:
        exec_command(api, "default", "p", ["true"], timeout=5)
    assert type(caught.value) is cls and str(caught.value) == text
    assert isinstance(caught.value.__cause__, KubeError) and caught.value.__cause__.status == status


class RecordingClock:
    """Time that stands still; each pause is recorded, not waited. After ``enough`` pauses it calls ``done``
    (or, without one, sets the event the pause would have waited on: the watch's stop)."""

    def __init__(self, enough: int, done: Callable[[], None] | None = None) -> None:
        self.pauses: list[float] = []
        self.enough = enough
        self.done = done

    def now(self) -> float:
        return 0.0

    def wait(self, seconds: float, stop: threading.Event | None = None) -> bool:
        self.pauses.append(seconds)
        if len(self.pauses) >= self.enough:
            if self.done is not None:
                self.done()
            elif stop is not None:
                stop.set()
        return stop is not None and stop.is_set()


def test_the_watch_backs_off_on_its_clock_doubling_to_the_cap(
        server: StatusServer, api: kubernetes.client.ApiClient) -> None:
    server.refuse(500, "down")
    clock = RecordingClock(enough=8)  # then it stops the watch
    watch = NamespaceWatch(api, "default", WatchTuning(backoff=0.5, backoff_cap=10.0, clock=clock))
    watch.thread.join(30)
    assert not watch.thread.is_alive() and watch.stopped
    assert clock.pauses == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert watch.last_error == "HTTP 500 Internal Server Error"


def test_the_log_follower_backs_off_on_its_clock_doubling_to_the_cap(
        server: StatusServer, api: kubernetes.client.ApiClient) -> None:
    server.refuse(503, "away")
    clock = RecordingClock(enough=7)
    follower = LogFollower(api, "default", "p", lambda *_: None, lambda: False, clock=clock)
    clock.done = follower.stop
    follower.start()
    assert follower.join(30)
    expected = [BACKOFF_INITIAL]
    while len(expected) < 7:
        expected.append(min(expected[-1] * 2, BACKOFF_CAP))
    assert clock.pauses == pytest.approx(expected) and expected[-1] == BACKOFF_CAP
    assert follower.error is None  # stopped, not given up


def test_the_resume_cursor_passes_each_line_on_once_across_resumes() -> None:
    """sinceTime has one-second precision: after a resume the lines of that second come again."""
    cursor = ResumeCursor()
    assert cursor.since_time() is None
    first = ["2024-01-01T00:00:01.100000000Z", "2024-01-01T00:00:01.200000000Z", "2024-01-01T00:00:01.200000000Z"]
    assert [cursor.accept(stamp) for stamp in first] == [1, 2, 3]
    assert cursor.since_time() == "2024-01-01T00:00:01Z"
    cursor.resume()  # the second again from its start, then one new line at the same stamp, then a later one
    again = [*first, "2024-01-01T00:00:01.200000000Z", "2024-01-01T00:00:02.000000000Z"]
    assert [cursor.accept(stamp) for stamp in again] == [None, None, None, 4, 5]
