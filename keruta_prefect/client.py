"""Client of the keruta API (standard library only: http.client): the calls of the agent contract, with
retry and backoff.

It is what every agent process loads, so it stays small: no third-party HTTP stack (httpx alone cost the agent
about 0.2 s of imports per task), ``ssl`` only for an https:// URL (see :func:`_http`), ``urllib.request``
only when a proxy is configured in the environment. One keep-alive connection per thread (the main thread and
the log shipper each keep their own).

Two kinds of failure, never confused:

- *unreachable* (:class:`ApiError`): transport errors, 408, 429 and 5xx are retried with exponential
  backoff (:class:`~keruta_prefect.backoff.Backoff`: RETRY_INITIAL_SECONDS doubling to RETRY_CAP_SECONDS,
  jittered) until ``retry_seconds`` have passed on the client's clock; then the call fails. Trying again
  later may help.
- *refused* (:class:`ApiRejected`): any other 4xx, an answer that is not the keruta API's JSON, or a URL
  the client cannot use. Sending the same request again cannot help, so it fails at once. ``permanent``
  refusals (401, 403, 404, 405, 407, 410, 414, 415, and anything that is not an HTTP answer) refuse every
  call alike; the others (400, 409, 413, 422…) concern this request's content.
"""

from __future__ import annotations

import base64
import json
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

from keruta_prefect.backoff import SYSTEM_CLOCK, Backoff, Clock
from keruta_prefect.contract import UsageKey
from keruta_prefect.errors import TransientError

if TYPE_CHECKING:
    import http.client
    import ssl

# Pauses between the tries of one request: 0.1 s doubling to 5 s, each spread over [0.5, 1.5) of itself so
# agents that lost the API together do not come back together.
RETRY_INITIAL_SECONDS = 0.1
RETRY_CAP_SECONDS = 5.0
RETRY_JITTER = 1.0
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
PERMANENT_STATUS = {401, 403, 404, 405, 407, 410, 414, 415}  # every call alike: wrong token, URL, proxy, route
UPLOAD_CHUNK = 1 << 16  # bytes of an artifact read from disk and sent at a time
JSON_TYPE = "application/json"


class ApiError(TransientError):
    """The keruta API could not be reached (or kept failing) within the retry budget."""


class ApiRejected(ApiError):
    transient = False  # refused, not unreachable: asking again gets the same answer

    """The keruta API refused the request (a 4xx, or an answer it cannot mean): sending it again cannot help.

    ``status`` is None when there was no HTTP answer to speak of (a URL the client cannot use)."""

    def __init__(self, status: int | None, detail: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {detail}" if status is not None else f"{what}: {detail}")
        self.status = status
        self.detail = detail
        self.what = what

    @property
    def permanent(self) -> bool:
        """True when every call will be refused alike (not only this request's content)."""
        return self.status is None or self.status in PERMANENT_STATUS


def encode_json(value: Any) -> bytes:
    """A JSON body exactly as it is sent, so its size can be measured."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


class Origin(NamedTuple):
    """Where an API URL points: scheme, host, port and the path every route is under."""

    scheme: str
    host: str
    port: int
    prefix: str


def api_origin(url: str) -> Origin:
    """The parts of an http:// or https:// URL of the keruta API; ValueError (saying why) if it is not one."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("whitespace or a control character in the URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"unsupported scheme {parts.scheme!r}: expected http or https")
    port = parts.port  # ValueError if not a number from 0 to 65535
    if not parts.hostname:
        raise ValueError("no host in the URL")
    if port == 0:
        raise ValueError("port 0")
    return Origin(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80),
                  parts.path.rstrip("/"))


@dataclass(frozen=True)
class Response:
    """An answer of the API, read whole (every answer of the contract is a small JSON document)."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The decoded JSON; ValueError if it is not JSON."""
        return json.loads(self.content)


class Payload(NamedTuple):
    """A request body: its type, its length and its bytes (streamed in pieces, e.g. a file from disk)."""

    content_type: str
    length: int
    chunks: Iterable[bytes]


class KerutaClient:
    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        retry_seconds: float = 300.0,
        timeout: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        """``clock`` measures the retry budget and waits the pauses (a test drives it instead of sleeping);
        ``sleep`` (older form) only replaces the waiting, time stays the system's. ``timeout``: seconds to
        connect, and for each read or write on the connection."""
        self.api_url = api_url.rstrip("/")
        self.retry_seconds = retry_seconds
        self.timeout = timeout
        self._clock: Clock = clock if sleep is None else _SleepClock(sleep)
        self._headers = {"Authorization": f"Bearer {token}", "User-Agent": "keruta-agent",
                         "Accept": "*/*", "Accept-Encoding": "identity"}
        self._local = threading.local()  # this thread's connection
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []  # every thread's, closed by close()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            self._closed = True
        for connection in connections:
            connection.close()

    def __enter__(self) -> KerutaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, what: str, retry_seconds: float | None = None,
                body: bytes | None = None, payload: Callable[[], Payload] | None = None) -> Response:
        """Send with retries. ``body``: JSON bytes; ``payload()`` (if given) makes a fresh body for each attempt."""
        try:
            origin = api_origin(self.api_url)
        except ValueError as exc:  # the request cannot be sent as configured: not the network
            raise ApiRejected(None, f"cannot send to {self.api_url}: {exc}", what) from None
        budget = self.retry_seconds if retry_seconds is None else retry_seconds
        deadline = self._clock.now() + budget
        backoff = Backoff(RETRY_INITIAL_SECONDS, RETRY_CAP_SECONDS, jitter=RETRY_JITTER)
        last = ""
        transport_errors = (OSError, _http().HTTPException)  # refused, reset, timed out, TLS, a broken answer
        while True:
            sent = payload() if payload is not None else (
                Payload(JSON_TYPE, len(body), (body,)) if body is not None else None)
            try:
                response = self._send(origin, method, origin.prefix + path, sent)
            except ApiRejected as exc:
                raise ApiRejected(None, exc.detail, what) from None
            except transport_errors as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code < 400:
                    return response
                detail = _detail(response)
                if response.status_code not in RETRYABLE_STATUS:
                    raise ApiRejected(response.status_code, detail, what)
                last = f"HTTP {response.status_code}: {detail}"
            finally:
                if sent is not None and isinstance(sent.chunks, Iterator):
                    _close(sent.chunks)
            remaining = deadline - self._clock.now()
            if remaining <= 0:
                raise ApiError(f"{what}: keruta API at {self.api_url} unreachable for {budget:.0f}s ({last})")
            backoff.pause(self._clock, at_most=remaining)

    # --- one attempt on this thread's connection -------------------------------------------------------------
    def _send(self, origin: Origin, method: str, target: str, payload: Payload | None) -> Response:
        connection = self._connection(origin)
        headers = dict(self._headers)
        if payload is not None:
            headers["Content-Type"] = payload.content_type
            headers["Content-Length"] = str(payload.length)
        elif method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = "0"
        if connection is not self._local.direct:  # through a proxy: the whole URL
            target = f"{origin.scheme}://{_host_header(origin)}{target}"
            headers.update(self._local.proxy_headers)
        try:
            try:
                connection.putrequest(method, target, skip_accept_encoding=True)
                for name, value in headers.items():
                    connection.putheader(name, value)
            except ValueError as exc:  # a header value or path that cannot be sent (not the network)
                raise ApiRejected(None, f"cannot send to {self.api_url}: {exc}", "") from None
            try:
                connection.endheaders()
                for chunk in payload.chunks if payload is not None else ():
                    connection.send(chunk)
            except OSError:
                # A server may answer (413) and close before it has read the whole body: its answer counts.
                answer = None
                if connection.sock is not None:  # connected, then cut off while sending
                    try:
                        answer = connection.getresponse()
                    except (OSError, _http().HTTPException):
                        pass
                if answer is None:
                    raise
            else:
                answer = connection.getresponse()
            return Response(answer.status, answer.read())
        except BaseException:
            connection.close()  # half a request or answer: the next one starts on a new connection
            raise

    def _connection(self, origin: Origin) -> http.client.HTTPConnection:
        """This thread's connection (made on first use; one the server closed while idle is reopened)."""
        local = self._local
        connection: http.client.HTTPConnection | None = getattr(local, "connection", None)
        if connection is None:
            connection = self._connect(origin)
            with self._lock:
                if self._closed:
                    raise ApiRejected(None, "the client is closed", "")
                self._connections.append(connection)
            local.connection = connection
        elif connection.sock is not None and _readable(connection.sock):
            connection.close()  # idle, yet readable: the server closed it (http.client reconnects)
        return connection

    def _connect(self, origin: Origin) -> http.client.HTTPConnection:
        local = self._local
        local.proxy_headers = {}
        proxy = _proxy_for(origin)
        host, port = (proxy.host, proxy.port) if proxy is not None else (origin.host, origin.port)
        connection: http.client.HTTPConnection
        if origin.scheme == "https":
            connection = _tls_connection_class()(host, port, timeout=self.timeout, context=_tls_context())
        else:
            connection = _http().HTTPConnection(host, port, timeout=self.timeout)
        if proxy is not None:
            credentials = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else {}
            if origin.scheme == "https":  # a tunnel through the proxy: the requests are the origin's own
                connection.set_tunnel(origin.host, origin.port, headers=credentials)
                local.direct = connection
            else:
                local.proxy_headers = credentials
                local.direct = None
        else:
            local.direct = connection
        return connection

    # --- the agent contract --------------------------------------------------------------------------
    def get_task(self, task_id: str) -> dict[str, Any]:
        what = f"fetch task {task_id}"
        return _object(self.request("GET", _task_path(task_id), what=what), what)

    def get_script(self, task_id: str) -> dict[str, Any]:
        what = f"fetch script of {task_id}"
        body = _object(self.request("GET", f"{_task_path(task_id)}/script", what=what), what)
        script = body.get("script")
        if not isinstance(script, dict) or not isinstance(script.get("content", ""), str):
            raise ApiRejected(200, f"no script in the answer: {_NOT_KERUTA}", what)
        return script

    def set_status(self, task_id: str, status: str, *, message: str | None = None, progress: int | None = None,
                   error_code: str | None = None, retry_seconds: float | None = None,
                   usage: dict[str, Any] | None = None) -> dict[str, Any]:
        """``usage``: what the script used (contract.UsageKey), with the final status; the original API ignores it."""
        body: dict[str, Any] = {"status": status, "message": message, "progress": progress, "errorCode": error_code}
        if usage is not None:
            body[UsageKey.FIELD] = usage
        what = f"report {status} for {task_id}"
        return _object(self.request("PUT", f"{_task_path(task_id)}/status", body=encode_json(body), what=what,
                                    retry_seconds=retry_seconds), what)

    def post_logs(self, task_id: str, source: str, lines: Sequence[dict[str, Any]],
                  retry_seconds: float | None = None) -> None:
        """One batch; the body is the bytes :func:`encode_json` gives, so a caller can bound its size."""
        body = encode_json({"source": source, "lines": list(lines)})
        self.request("POST", f"{_task_path(task_id)}/logs", body=body,
                     what=f"send {len(lines)} log lines of {task_id}", retry_seconds=retry_seconds)

    def upload_artifact(self, task_id: str, path: Path, relative: str, description: str | None = None) -> None:
        """One file as multipart/form-data (fields ``description`` and ``path``, then the file), streamed from
        disk a chunk at a time: a large file is never whole in memory. Each attempt reads the file afresh."""

        def payload() -> Payload:
            boundary = os.urandom(16).hex()
            head = b"".join(_form_field(boundary, name, value)
                            for name, value in (("description", description or ""), ("path", relative)))
            head += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                     f"filename=\"{_form_quote(path.name)}\"\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n").encode()
            tail = f"\r\n--{boundary}--\r\n".encode()
            handle = path.open("rb")  # opened here, so a file that cannot be read fails the call at once
            size = os.fstat(handle.fileno()).st_size
            return Payload(f"multipart/form-data; boundary={boundary}", len(head) + size + len(tail),
                           _file_chunks(head, handle, size, tail))

        self.request("POST", f"{_task_path(task_id)}/artifacts", payload=payload,
                     what=f"upload artifact {relative} of {task_id}")

    def health(self) -> None:
        """One try, no retry. Raises ApiError if nothing answers, ApiRejected if what answers is not a keruta API."""
        what = f"health check of {self.api_url}"
        body = _object(self.request("GET", "/api/v1/health", what=what, retry_seconds=0), what)
        if body.get("status") != "ok":
            raise ApiRejected(200, f"{str(body)[:100]}: {_NOT_KERUTA}", what)


class _SleepClock:
    """The system's time, waiting with a given ``sleep`` (what ``KerutaClient(sleep=…)`` means)."""

    def __init__(self, sleep: Callable[[float], None]) -> None:
        self._sleep = sleep

    def now(self) -> float:
        return time.monotonic()

    def wait(self, seconds: float, stop: threading.Event | None = None) -> bool:
        self._sleep(seconds)
        return False


# --- the wire ---------------------------------------------------------------------------------------------------

def _readable(sock: Any) -> bool:
    """An idle keep-alive socket with something to read has been closed by the server (or is out of step)."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _host_header(origin: Origin) -> str:
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    default = 443 if origin.scheme == "https" else 80
    return host if origin.port == default else f"{host}:{origin.port}"


_HTTP_CLIENT: Any = None


def _http() -> Any:
    """http.client, loaded on the first request, without ssl unless it is already loaded: http.client imports
    ssl only to offer HTTPSConnection, and loading OpenSSL costs each agent process about 20 ms of CPU that
    an http:// API (the in-cluster Service, the embedded API) never uses. An https:// API loads ssl itself
    (:func:`_tls_context`) and connects through :func:`_tls_connection_class`."""
    global _HTTP_CLIENT
    if _HTTP_CLIENT is None:
        if "ssl" in sys.modules or "http.client" in sys.modules:
            import http.client
        else:
            sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` fails: as if built without it
            try:
                import http.client
            finally:
                del sys.modules["ssl"]
        _HTTP_CLIENT = http.client
    return _HTTP_CLIENT


def _tls_connection_class() -> Callable[..., http.client.HTTPConnection]:
    """An HTTPConnection that speaks TLS: what http.client's HTTPSConnection does, whether or not http.client
    was loaded with ssl (see :func:`_http`)."""

    class TLSConnection(_http().HTTPConnection):  # type: ignore[misc]
        default_port = 443

        def __init__(self, host: str, port: int, *, timeout: float, context: ssl.SSLContext) -> None:
            super().__init__(host, port, timeout=timeout)
            self._context = context

        def connect(self) -> None:
            super().connect()  # TCP, and the CONNECT through a proxy's tunnel
            self.sock = self._context.wrap_socket(self.sock,  # type: ignore[has-type]
                                                  server_hostname=self._tunnel_host or self.host)

    return TLSConnection


def _tls_context() -> ssl.SSLContext:
    """Verified TLS, as before: SSL_CERT_FILE or SSL_CERT_DIR if set, else certifi's bundle (else the system's).
    ``ssl`` is imported only here: an http:// API never pays for it."""
    context = _verified_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


def _verified_context() -> ssl.SSLContext:
    import ssl

    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


class _Proxy(NamedTuple):
    host: str
    port: int
    authorization: str | None


def _proxy_for(origin: Origin) -> _Proxy | None:
    """The proxy the environment names for this URL (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY; read as
    urllib reads them), or None. urllib.request is imported only when such a variable is set."""
    if not any(name.lower() in ("http_proxy", "https_proxy", "all_proxy") for name in os.environ):
        return None
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    url = proxies.get(origin.scheme) or proxies.get("all")
    if not url or urllib.request.proxy_bypass(origin.host):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname:
        return None
    authorization = None
    if parts.username is not None:
        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(secret).decode("ascii")
    return _Proxy(parts.hostname, parts.port or 80, authorization)


def _form_quote(value: str) -> str:
    """A name or file name inside a Content-Disposition's quotes (the HTML5 form encoding browsers use)."""
    return "".join("%22" if c == '"' else "\\\\" if c == "\\" else f"%{ord(c):02X}" if ord(c) < 32 and c != "\x1b"
                   else c for c in value)


def _form_field(boundary: str, name: str, value: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{_form_quote(name)}\"\r\n\r\n"
            f"{value}\r\n").encode()


class SourceError(RuntimeError):
    """The file being uploaded could not be read to the length announced (it shrank, or a read failed)."""


def _file_chunks(head: bytes, handle: Any, size: int, tail: bytes) -> Iterator[bytes]:
    """The body of an upload: ``head``, exactly ``size`` bytes of the file (as the Content-Length said), ``tail``.
    The file is closed when the body is sent or abandoned."""
    with handle:
        yield head
        left = size
        while left > 0:
            try:
                chunk = handle.read(min(UPLOAD_CHUNK, left))
            except OSError as exc:
                raise SourceError(f"cannot read {handle.name}: {exc.strerror or exc}") from None
            if not chunk:
                raise SourceError(f"{handle.name} shrank while it was sent ({size - left} of {size} bytes)")
            left -= len(chunk)
            yield chunk
        yield tail


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def _task_path(task_id: str) -> str:
    return f"/api/v1/tasks/{quote(task_id, safe='')}"  # an id can never reach another route


_NOT_KERUTA = "not a keruta API answer (is the API URL right?)"


def _object(response: Response, what: str) -> dict[str, Any]:
    """The answer's JSON object; an answer that is not one (a login page, a proxy's HTML) is a refusal."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        shown = " ".join(response.text[:60].split())  # one line
        raise ApiRejected(response.status_code, f"{shown!r}: {_NOT_KERUTA}", what)
    return body


def _detail(response: Response) -> str:
    """The answer's ``detail`` (or its start), on one line."""
    try:
        body = response.json()
    except ValueError:
        text = response.text[:200]
    else:
        text = str(body["detail"])[:500] if isinstance(body, dict) and "detail" in body else str(body)[:200]
    return " ".join(text.split())
