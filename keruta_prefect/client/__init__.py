"""Client of the keruta API (standard library only: http.client): the calls of the agent contract, with
retry and backoff.

It is what every agent process loads, so it stays small: no third-party HTTP stack (httpx alone cost the agent
about 0.2 s of imports per task). One request on the wire (a keep-alive connection per thread, TLS, proxies,
multipart) is :mod:`.wire`'s.

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

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from keruta_prefect.backoff import SYSTEM_CLOCK, Backoff, Clock
from keruta_prefect.client.wire import (
    JSON_TYPE,
    Connections,
    Payload,
    Response,
    SourceError,
    Unsendable,
    api_origin,
    close_body,
    multipart_file,
)
from keruta_prefect.contract import UsageKey
from keruta_prefect.errors import TransientError

__all__ = ["ApiError", "ApiRejected", "KerutaClient", "Response", "SourceError", "api_origin", "encode_json"]

# Pauses between the tries of one request: 0.1 s doubling to 5 s, each spread over [0.5, 1.5) of itself so
# agents that lost the API together do not come back together.
RETRY_INITIAL_SECONDS = 0.1
RETRY_CAP_SECONDS = 5.0
RETRY_JITTER = 1.0
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
PERMANENT_STATUS = {401, 403, 404, 405, 407, 410, 414, 415}  # every call alike: wrong token, URL, proxy, route


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
        self._clock: Clock = clock if sleep is None else _SleepClock(sleep)
        self._wire = Connections({"Authorization": f"Bearer {token}", "User-Agent": "keruta-agent"}, timeout)

    def close(self) -> None:
        self._wire.close()

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
        transport_errors = (OSError, http.client.HTTPException)  # refused, reset, timed out, TLS, a broken answer
        while True:
            sent = payload() if payload is not None else (
                Payload(JSON_TYPE, len(body), (body,)) if body is not None else None)
            try:
                response = self._wire.send(origin, method, origin.prefix + path, sent)
            except Unsendable as exc:
                raise ApiRejected(None, f"cannot send to {self.api_url}: {exc}", what) from None
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
                    close_body(sent.chunks)
            remaining = deadline - self._clock.now()
            if remaining <= 0:
                raise ApiError(f"{what}: keruta API at {self.api_url} unreachable for {budget:.0f}s ({last})")
            backoff.pause(self._clock, at_most=remaining)

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
        disk; each attempt reads the file afresh."""
        self.request("POST", f"{_task_path(task_id)}/artifacts",
                     payload=lambda: multipart_file(path, {"description": description or "", "path": relative}),
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
