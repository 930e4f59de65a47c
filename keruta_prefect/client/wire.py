"""One HTTP request of the keruta client over the standard library's http.client: a keep-alive connection per
thread, TLS for https://, a proxy from the
environment, the multipart body of an artifact streamed from disk. Retries and meanings are the client's
(:mod:`keruta_prefect.client`)."""

from __future__ import annotations

import http.client
import json
import os
import select
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import ssl

JSON_TYPE = "application/json"
UPLOAD_CHUNK = 1 << 16  # bytes of an artifact read from disk and sent at a time
MAX_ANSWER_BYTES = 64 << 20  # the largest answer read (a task with its script and description is far smaller)
ANSWER_PIECE = 1 << 16  # …read this much at a time


class Unsendable(ValueError):
    """The request cannot be sent as configured (a header value, a closed client): not the network."""


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


class Connections:
    """One keep-alive connection per thread (the agent's main thread and its log shipper each have their own);
    ``close`` closes them all."""

    def __init__(self, headers: dict[str, str], timeout: float) -> None:
        self.timeout = timeout
        self._headers = {**headers, "Accept": "*/*", "Accept-Encoding": "identity"}
        self._local = threading.local()  # this thread's connection
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []  # every thread's
        self._closed = False

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            self._closed = True
        for connection in connections:
            connection.close()

    def send(self, origin: Origin, method: str, target: str, payload: Payload | None) -> Response:
        """One request on this thread's connection, its answer read whole. Raises OSError or
        http.client.HTTPException (the network, the server's answer cut off), Unsendable (not the network)."""
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
                raise Unsendable(str(exc)) from None
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
                    except (OSError, http.client.HTTPException):
                        pass
                if answer is None:
                    raise
            else:
                answer = connection.getresponse()
            return Response(answer.status, _bounded_body(answer))
        except BaseException:
            connection.close()  # half a request or answer: the next one starts on a new connection
            raise

    def _connection(self, origin: Origin) -> http.client.HTTPConnection:
        """This thread's connection (made on first use; one the server closed while idle is reopened)."""
        if self._closed:
            raise Unsendable("the client is closed")
        local = self._local
        connection: http.client.HTTPConnection | None = getattr(local, "connection", None)
        if connection is None:
            connection = self._connect(origin)
            with self._lock:
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
            connection = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=_tls_context())
        else:
            connection = http.client.HTTPConnection(host, port, timeout=self.timeout)
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


def _tls_context() -> ssl.SSLContext:
    """Verified TLS, as before: SSL_CERT_FILE or SSL_CERT_DIR if set, else certifi's bundle (else the system's)."""
    context = _verified_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


def _bounded_body(answer: http.client.HTTPResponse) -> bytes:
    """The answer's body, read in pieces and at most MAX_ANSWER_BYTES (no keruta API answer comes near it): a
    Content-Length far beyond that is a broken answer (retried), never a MemoryError."""
    length = answer.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > MAX_ANSWER_BYTES:
        raise http.client.HTTPException(f"an answer of {int(length)} bytes (over {MAX_ANSWER_BYTES})")
    pieces, size = [], 0
    while piece := answer.read(ANSWER_PIECE):
        size += len(piece)
        if size > MAX_ANSWER_BYTES:
            raise http.client.HTTPException(f"an answer of more than {MAX_ANSWER_BYTES} bytes")
        pieces.append(piece)
    return b"".join(pieces)


def _verified_context() -> ssl.SSLContext:
    import ssl

    for variable in ("SSL_CERT_FILE", "SSL_CERT_DIR"):  # the user's CA: a wrong one is configuration, not network
        where = os.environ.get(variable)
        if where and not os.path.exists(where):
            raise Unsendable(f"{variable}={where!r}: no such file or directory")
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
        import base64

        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(secret).decode("ascii")
    return _Proxy(parts.hostname, parts.port or 80, authorization)


def form_quote(value: str) -> str:
    """A name or file name inside a Content-Disposition's quotes (the HTML5 form encoding browsers use)."""
    return "".join("%22" if c == '"' else "\\\\" if c == "\\" else f"%{ord(c):02X}" if ord(c) < 32 and c != "\x1b"
                   else c for c in value)


def form_field(boundary: str, name: str, value: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{form_quote(name)}\"\r\n\r\n"
            f"{value}\r\n").encode()


class SourceError(RuntimeError):
    """The file being uploaded could not be read to the length announced (it shrank, or a read failed)."""


def file_chunks(head: bytes, handle: Any, size: int, tail: bytes) -> Iterator[bytes]:
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


def close_body(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def multipart_file(path: Path, fields: dict[str, str]) -> Payload:
    """multipart/form-data: ``fields``, then the file as ``file`` (its name, its bytes streamed from disk: a large
    file is never whole in memory). Opened here, so a file that cannot be opened fails at once."""
    boundary = os.urandom(16).hex()
    head = b"".join(form_field(boundary, name, value) for name, value in fields.items())
    head += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{form_quote(path.name)}\"\r\n"
             "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    handle = path.open("rb")
    size = os.fstat(handle.fileno()).st_size
    return Payload(f"multipart/form-data; boundary={boundary}", len(head) + size + len(tail),
                   file_chunks(head, handle, size, tail))
