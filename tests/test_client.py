"""The httpx client of an external keruta API: retries, backoff and what is never retried (respx)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import respx

from keruta_prefect.client import ApiError, ApiRejected, KerutaClient

URL = "http://keruta-api.example:8080"


def client(retry_seconds: float = 30) -> tuple[KerutaClient, list[float]]:
    sleeps: list[float] = []
    return KerutaClient(URL, "tok", retry_seconds=retry_seconds, sleep=sleeps.append), sleeps


@respx.mock
def test_5xx_and_connection_errors_are_retried_with_growing_backoff() -> None:
    route = respx.put(f"{URL}/api/v1/tasks/t/status").mock(side_effect=[
        httpx.ConnectError("refused"), httpx.Response(503, json={"detail": "busy"}),
        httpx.Response(500), httpx.Response(200, json={"id": "t", "status": "IN_PROGRESS"}),
    ])
    api, sleeps = client()
    assert api.set_status("t", "IN_PROGRESS")["status"] == "IN_PROGRESS"
    assert route.call_count == 4
    assert route.calls[0].request.headers["Authorization"] == "Bearer tok"
    assert len(sleeps) == 3 and sleeps[2] > sleeps[0]  # exponential, jittered


@respx.mock
def test_4xx_is_not_retried_and_names_the_call() -> None:
    answer = httpx.Response(404, json={"detail": "task 't' not found"})
    route = respx.get(f"{URL}/api/v1/tasks/t").mock(return_value=answer)
    api, sleeps = client()
    with pytest.raises(ApiRejected, match=r"^fetch task t: HTTP 404: task 't' not found$"):
        api.get_task("t")
    assert route.call_count == 1 and sleeps == []


@respx.mock
def test_gives_up_after_the_retry_budget_with_the_last_error() -> None:
    respx.post(f"{URL}/api/v1/tasks/t/logs").mock(return_value=httpx.Response(503, json={"detail": "down"}))
    api, _ = client(retry_seconds=0)
    with pytest.raises(ApiError, match=r"unreachable for 0s \(HTTP 503: down\)"):
        api.post_logs("t", "src", [{"seq": 0, "message": "x"}])


@respx.mock
def test_an_artifact_upload_sends_the_whole_file_again_on_retry(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"0123456789" * 1000)
    bodies: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return httpx.Response(502 if len(bodies) == 1 else 200, json={"success": True})

    respx.post(f"{URL}/api/v1/tasks/t/artifacts").mock(side_effect=answer)
    api, _ = client()
    api.upload_artifact("t", path, "out.bin")
    assert len(bodies) == 2  # each attempt carries the whole file (the multipart boundary differs)
    assert all(b"0123456789" * 1000 in body for body in bodies)
