"""httpx client of the keruta API: the calls of the agent contract, with retry and backoff.

Transport errors, 5xx and 429 are retried with exponential backoff until ``retry_seconds`` have
passed; other 4xx answers fail at once (:class:`ApiRejected`), because sending them again cannot help.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

RETRYABLE_STATUS = {429, 500, 502, 503, 504}


class ApiError(Exception):
    """The keruta API could not be reached (or kept failing) within the retry budget."""


class ApiRejected(ApiError):
    """The keruta API answered with a 4xx: the request itself is wrong (bad token, unknown task…)."""

    def __init__(self, status: int, detail: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class KerutaClient:
    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        retry_seconds: float = 300.0,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.retry_seconds = retry_seconds
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "keruta-agent"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KerutaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, what: str, retry_seconds: float | None = None,
                build: Callable[[], dict[str, Any]] | None = None, **kwargs: Any) -> httpx.Response:
        """Send with retries; ``build()`` (if given) makes fresh keyword arguments for each attempt."""
        budget = self.retry_seconds if retry_seconds is None else retry_seconds
        deadline = time.monotonic() + budget
        delay = 0.1
        last = ""
        while True:
            try:
                response = self._http.request(method, path, **(build() if build else kwargs))
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code < 400:
                    return response
                detail = _detail(response)
                if response.status_code not in RETRYABLE_STATUS:
                    raise ApiRejected(response.status_code, detail, what)
                last = f"HTTP {response.status_code}: {detail}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApiError(f"{what}: keruta API at {self.api_url} unreachable for {budget:.0f}s ({last})")
            self._sleep(min(delay * (0.5 + random.random()), remaining))
            delay = min(delay * 2, 5.0)

    # --- the agent contract --------------------------------------------------------------------------
    def get_task(self, task_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/tasks/{task_id}", what=f"fetch task {task_id}").json()

    def get_script(self, task_id: str) -> dict[str, Any]:
        body = self.request("GET", f"/api/v1/tasks/{task_id}/script", what=f"fetch script of {task_id}").json()
        return body["script"]

    def set_status(self, task_id: str, status: str, *, message: str | None = None, progress: int | None = None,
                   error_code: str | None = None, retry_seconds: float | None = None) -> dict[str, Any]:
        body = {"status": status, "message": message, "progress": progress, "errorCode": error_code}
        return self.request("PUT", f"/api/v1/tasks/{task_id}/status", json=body,
                            what=f"report {status} for {task_id}", retry_seconds=retry_seconds).json()

    def post_log(self, task_id: str, level: str, message: str) -> None:
        self.request("POST", f"/api/v1/tasks/{task_id}/logs", json={"level": level, "message": message},
                     what=f"send a log line of {task_id}")

    def post_logs(self, task_id: str, source: str, lines: Sequence[dict[str, Any]],
                  retry_seconds: float | None = None) -> None:
        self.request("POST", f"/api/v1/tasks/{task_id}/logs", json={"source": source, "lines": list(lines)},
                     what=f"send {len(lines)} log lines of {task_id}", retry_seconds=retry_seconds)

    def upload_artifact(self, task_id: str, path: Path, relative: str, description: str | None = None) -> None:
        handles: list[Any] = []

        def build() -> dict[str, Any]:
            # A fresh handle for every attempt (a failed attempt may have consumed the last one); httpx
            # streams it from disk, so a large file is never whole in memory.
            for handle in handles:
                handle.close()
            handles[:] = [path.open("rb")]
            return {"files": {"file": (path.name, handles[0])},
                    "data": {"description": description or "", "path": relative}}

        try:
            self.request("POST", f"/api/v1/tasks/{task_id}/artifacts", build=build,
                         what=f"upload artifact {relative} of {task_id}")
        finally:
            for handle in handles:
                handle.close()

    def health(self) -> bool:
        try:
            return self._http.get("/api/v1/health").status_code == 200
        except httpx.TransportError:
            return False


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500]
    return str(body)[:200]
