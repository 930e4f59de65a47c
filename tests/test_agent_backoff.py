"""The agent's retries follow the one backoff policy, on a clock the test drives (no real pause).

A real HTTP server on loopback answers from a script (503 until told otherwise); the client and the log
shipper wait through a fake clock that records each pause and moves time on by it. So the pauses, and the end
of the retry budget, are exact and do not depend on this machine's speed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from keruta_prefect.agent.shipper import SHIP_BACKOFF_CAP, SHIP_BACKOFF_INITIAL, LogShipper
from keruta_prefect.backoff import Backoff
from keruta_prefect.client import (
    RETRY_CAP_SECONDS,
    RETRY_INITIAL_SECONDS,
    RETRY_JITTER,
    ApiError,
    ApiRejected,
    KerutaClient,
)

SECONDS = 10.0  # a condition the test awaits holds within this (it is never slept)


class FakeClock:
    """Time that moves only when someone waits: ``wait`` records the pause and adds it to ``now``."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._now = 1000.0
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def wait(self, seconds: float, stop: threading.Event | None = None) -> bool:
        with self._lock:
            self.pauses.append(seconds)
            self._now += seconds
        return stop is not None and stop.is_set()


class ScriptedApi:
    """Answers each request with the next status of ``statuses`` (200 once they are used up); keeps the
    log lines of the batches it answered 200."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests = 0
        self.stored: list[str] = []
        self.changed = threading.Condition()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with api.changed:
                    api.requests += 1
                    status = api.statuses.pop(0) if api.statuses else 200
                    if status == 200 and self.path.endswith("/logs"):
                        api.stored.extend(line["message"] for line in json.loads(body)["lines"])
                    api.changed.notify_all()
                answer = json.dumps({"id": "t", "status": "IN_PROGRESS"} if status == 200 else {"detail": "busy"})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer.encode())

            do_GET = do_PUT = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def await_stored(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.stored) >= count, SECONDS), self.stored


@contextmanager
def scripted_api(statuses: list[int]) -> Iterator[ScriptedApi]:
    api = ScriptedApi(statuses)
    thread = threading.Thread(target=api.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        api.server.shutdown()
        api.server.server_close()
        thread.join()


def policy(initial: float, cap: float, count: int) -> list[float]:
    """The first ``count`` pauses of the policy, before jitter."""
    backoff = Backoff(initial, cap)
    return [backoff.next_delay() for _ in range(count)]


def test_the_client_retries_on_the_policy_until_its_budget_ends_the_call() -> None:
    assert policy(RETRY_INITIAL_SECONDS, RETRY_CAP_SECONDS, 8) == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])  # the numbers of the loop this replaced
    clock = FakeClock()
    with (scripted_api([503] * 1000) as api, KerutaClient(api.url, "tok", retry_seconds=20, clock=clock) as client,
          pytest.raises(ApiError, match=r"unreachable for 20s \(HTTP 503: busy\)") as failed):
        client.set_status("t", "IN_PROGRESS")
    assert not isinstance(failed.value, ApiRejected)  # unreachable, not refused
    pauses = clock.pauses
    assert api.requests == len(pauses) + 1  # a try after each pause; the budget ends it at the last try
    assert sum(pauses) == pytest.approx(20.0)  # the whole budget, and not a pause more
    spread = RETRY_JITTER / 2
    bases = policy(RETRY_INITIAL_SECONDS, RETRY_CAP_SECONDS, len(pauses))
    for pause, base in zip(pauses[:-1], bases[:-1], strict=True):
        assert base * (1 - spread) <= pause < base * (1 + spread), (pauses, base)
    assert 0 < pauses[-1] < bases[-1] * (1 + spread)  # the last pause is cut to what is left of the budget


def test_each_call_of_the_client_starts_again_from_the_first_pause() -> None:
    clock = FakeClock()
    with scripted_api([503, 503, 503, 200, 502, 200]) as api, \
            KerutaClient(api.url, "tok", retry_seconds=60, clock=clock) as client:
        client.set_status("t", "IN_PROGRESS")
        client.set_status("t", "IN_PROGRESS")
    assert api.requests == 6 and len(clock.pauses) == 4
    first, second, third, again = clock.pauses
    low, high = 1 - RETRY_JITTER / 2, 1 + RETRY_JITTER / 2
    assert 0.1 * low <= first < 0.1 * high and 0.2 * low <= second < 0.2 * high and 0.4 * low <= third < 0.4 * high
    assert 0.1 * low <= again < 0.1 * high  # a new call: the first pause again


def test_the_log_shipper_pauses_on_the_policy_and_starts_again_after_a_success(tmp_path: Path) -> None:
    """While the API answers 503, the shipper tries once a round (the client's budget is 0 while the script
    runs) and pauses 0.1 s doubling to 5 s between rounds; a stored batch resets the pauses."""
    clock = FakeClock()
    down = 9
    with scripted_api([503] * down) as api, KerutaClient(api.url, "tok", retry_seconds=0, clock=clock) as client:
        shipper = LogShipper(client, "t", tmp_path / "spool.jsonl", clock=clock)
        shipper.emit("INFO", "first")
        api.await_stored(1)
        assert clock.pauses == pytest.approx(policy(SHIP_BACKOFF_INITIAL, SHIP_BACKOFF_CAP, down))
        assert clock.pauses == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
        with api.changed:
            api.statuses.extend([503, 503])  # away again, briefly
        shipper.emit("INFO", "second")
        api.await_stored(2)
        assert shipper.close(5) == 0
    assert clock.pauses[down:] == pytest.approx([0.1, 0.2])  # from the first pause again
    assert api.stored == ["first", "second"] and api.requests == down + 1 + 2 + 1
    assert shipper.refused is None and shipper.failure is None and shipper.lost == 0
