"""Processes the tests and benchmarks start: a free loopback port, a Prefect server, stopping a child."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()


@contextmanager
def prefect_server(env: dict[str, str], log_path: Path, port: int | None = None,
                   timeout: float = 90) -> Iterator[str]:
    """`prefect server start` (API and UI) on loopback (``port``, or a free one) with ``env``; yields its
    base URL (the API is under /api) once it answers its health check."""
    port = port or free_port()
    with log_path.open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the Prefect server did not start:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            yield base
        finally:
            # A throwaway server: SIGTERM lets uvicorn wait for its clients' open connections (the event
            # websockets of every flow run of the session) for as long as they stay open; 5 s is enough for it
            # to write what it holds, and then it is killed.
            stop_process(server, timeout=5)
