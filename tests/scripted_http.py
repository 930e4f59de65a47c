"""A real HTTP/1.1 server on loopback that answers what a test scripts: the client's tests talk to it over
sockets (keep-alive, closed connections, proxies), as the agent talks to an API."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl


@dataclass(frozen=True)
class Seen:
    """One request as the server read it; ``connection`` numbers the TCP connection it came on."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes | None = None  # raw bytes, else ``json`` encoded
    json: Any = None
    content_type: str = "application/json"

    def encoded(self) -> bytes:
        return self.body if self.body is not None else json.dumps(self.json).encode()


DROP = Answer(status=0)  # close the connection without an answer (the client sees a transport error)

Script = Callable[[Seen], Answer]


class ScriptedServer:
    """Answers each request with ``script(request)``; or, given a list, with its next item (then 200 ``{}``)."""

    def __init__(self, script: Script | list[Answer], tls: ssl.SSLContext | None = None) -> None:
        if isinstance(script, list):
            queue = list(script)
            script = lambda _seen: queue.pop(0) if queue else Answer(json={})  # noqa: E731
        self.script = script
        self.seen: list[Seen] = []
        self.connections = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server.connections += 1
                    self.number = server.connections

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen = Seen(self.command, self.path, dict(self.headers), body, self.number)
                with server._lock:
                    server.seen.append(seen)
                answer = server.script(seen)
                if answer.status == 0:
                    self.close_connection = True
                    return
                content = answer.encoded()
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_PUT = do_POST = _handle

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}"


@contextmanager
def scripted(script: Script | list[Answer], tls: ssl.SSLContext | None = None) -> Iterator[ScriptedServer]:
    server = ScriptedServer(script, tls)
    thread = threading.Thread(target=server.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
        thread.join()
