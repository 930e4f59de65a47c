"""The keruta API contract the agent speaks, over real HTTP on loopback."""

from __future__ import annotations

import hashlib
import hmac

import httpx
import pytest

from keruta_prefect.models import Task
from tests.conftest import Api


@pytest.fixture
def http(api: Api) -> httpx.Client:
    with httpx.Client(base_url=api.url, headers=api.headers, timeout=10) as client:
        yield client


def test_health_needs_no_token(api: Api) -> None:
    assert httpx.get(f"{api.url}/api/v1/health").json() == {"status": "ok"}


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic abc", "Bearer"])
def test_every_task_call_needs_the_token(api: Api, header: str | None) -> None:
    api.store.create_task(Task(id="t"))
    headers = {"Authorization": header} if header else {}
    for method, path in [("GET", "/api/v1/tasks/t"), ("GET", "/api/v1/tasks/t/script"), ("GET", "/api/v1/tasks"),
                         ("PUT", "/api/v1/tasks/t/status"), ("POST", "/api/v1/tasks/t/logs"),
                         ("POST", "/api/v1/tasks"), ("POST", "/api/v1/tasks/t/artifacts")]:
        response = httpx.request(method, api.url + path, headers=headers, json={"status": "COMPLETED"})
        assert response.status_code == 401, (method, path)
        assert "token" in response.json()["detail"]
    assert api.store.get_task("t").status == "PENDING"  # nothing changed


def test_create_get_and_list_tasks(http: httpx.Client) -> None:
    created = http.post("/api/v1/tasks", json={"id": "a", "title": "A", "priority": 1, "script": "echo a"})
    assert created.status_code == 201
    assert created.json()["status"] == "PENDING" and created.json()["additionalEnv"] == {}
    http.post("/api/v1/tasks", json={"id": "b", "title": "B", "priority": 9})
    assert http.get("/api/v1/tasks/a").json()["title"] == "A"
    assert [t["id"] for t in http.get("/api/v1/tasks").json()] == ["b", "a"]  # by priority
    assert http.post("/api/v1/tasks", json={"id": "a"}).status_code == 409
    bad = http.post("/api/v1/tasks", json={"id": "c", "additionalEnv": {"no-dash": "x"}})
    assert bad.status_code == 422 and "additionalEnv" in bad.json()["detail"]


def test_unknown_task_is_404_with_a_message(http: httpx.Client) -> None:
    for response in (http.get("/api/v1/tasks/ghost"), http.get("/api/v1/tasks/ghost/script"),
                     http.put("/api/v1/tasks/ghost/status", json={"status": "IN_PROGRESS"}),
                     http.post("/api/v1/tasks/ghost/logs", json={"level": "INFO", "message": "x"})):
        assert response.status_code == 404
        assert response.json() == {"detail": "task 'ghost' not found"}


def test_script_is_served_in_the_original_shape_with_a_shebang(api: Api, http: httpx.Client) -> None:
    api.store.create_task(Task.model_validate({"id": "s", "script": {"content": "echo hi", "filename": "run.sh"}}))
    body = http.get("/api/v1/tasks/s/script").json()
    assert body == {"success": True, "taskId": "s", "script": {"content": "#!/bin/sh\necho hi", "language": "sh",
                                                               "filename": "run.sh", "parameters": {}}}
    api.store.create_task(Task(id="none"))
    assert http.get("/api/v1/tasks/none/script").json()["detail"] == "task 'none' has no script"


def test_status_updates_enforce_transitions_with_409_naming_both(api: Api, http: httpx.Client) -> None:
    api.store.create_task(Task(id="t", description="keep me"))
    assert http.put("/api/v1/tasks/t/status", json={"status": "IN_PROGRESS", "progress": 40}).json()["progress"] == 40
    done = http.put("/api/v1/tasks/t/status", json={"status": "COMPLETED", "message": "fine", "errorCode": None})
    assert done.json()["status"] == "COMPLETED" and done.json()["description"] == "keep me"
    back = http.put("/api/v1/tasks/t/status", json={"status": "IN_PROGRESS"})
    assert back.status_code == 409
    assert back.json()["detail"].startswith("cannot move a task from COMPLETED to IN_PROGRESS")
    again = http.put("/api/v1/tasks/t/status", json={"status": "COMPLETED"})  # a retried report is fine
    assert again.status_code == 200
    bad = http.put("/api/v1/tasks/t/status", json={"status": "DONE"})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("status='DONE'")
    assert http.put("/api/v1/tasks/t/status", json={"status": "COMPLETED", "progress": 101}).status_code == 422


def test_logs_single_line_and_batches_with_exactly_once_storage(api: Api, http: httpx.Client) -> None:
    api.store.create_task(Task(id="t"))
    assert http.post("/api/v1/tasks/t/logs", json={"level": "INFO", "message": "one"}).json()["stored"] == 1
    assert http.post("/api/v1/tasks/t/logs", json={"level": "INFO", "message": "one"}).json()["stored"] == 1
    batch = {"source": "agent-x", "lines": [{"seq": i, "level": "ERROR", "message": f"m{i}"} for i in range(3)]}
    assert http.post("/api/v1/tasks/t/logs", json=batch).json() == {"success": True, "received": 3, "stored": 3}
    assert http.post("/api/v1/tasks/t/logs", json=batch).json()["stored"] == 0  # resent: nothing doubled
    listed = http.post("/api/v1/tasks/t/logs", json=[{"level": "warn", "message": "w"}])
    assert listed.json()["stored"] == 1
    assert [r.message for r in api.store.logs("t")] == ["one", "one", "m0", "m1", "m2", "w"]
    assert [r.level for r in api.store.logs("t")][-1] == "WARN"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"level": "LOUD", "message": "x"}, 422, "level='LOUD': allowed"),
        ({"level": "INFO"}, 422, "message: is required"),
        ({"level": "INFO", "message": "x" * 70000}, 413, "message="),
    ],
)
def test_bad_log_posts(api: Api, http: httpx.Client, body: dict[str, str], status: int, fragment: str) -> None:
    api.store.create_task(Task(id="t"))
    response = http.post("/api/v1/tasks/t/logs", json=body)
    assert response.status_code == status and fragment in response.json()["detail"]
    assert api.store.count_logs("t") == 0


def test_malformed_json_is_400(api: Api, http: httpx.Client) -> None:
    api.store.create_task(Task(id="t"))
    response = http.post("/api/v1/tasks/t/logs", content=b"{nope", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["detail"] == "body is not valid JSON"


def test_artifact_upload_is_stored_with_checksum(api: Api, http: httpx.Client) -> None:
    api.store.create_task(Task(id="t"))
    data = b"report\n" * 1000
    response = http.post("/api/v1/tasks/t/artifacts", files={"file": ("report.txt", data)},
                         data={"description": "the report"})
    assert response.status_code == 200
    assert response.json()["sha256"] == hashlib.sha256(data).hexdigest()
    [row] = api.store.artifacts("t")
    assert (row.path, row.size) == ("report.txt", len(data))
    assert (api.artifacts_root / "t" / "uploads" / "report.txt").read_bytes() == data
    traversal = http.post("/api/v1/tasks/t/artifacts", files={"file": ("x", b"x")}, data={"path": "../../etc/x"})
    assert traversal.status_code == 422 and "without '..'" in traversal.json()["detail"]


def test_token_comparison_takes_the_same_time_whatever_the_prefix(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every token check goes through hmac.compare_digest (constant time whatever prefix matches) — checked
    by what is called, not by timing HTTP calls, whose noise would hide a short-circuiting comparison."""
    import keruta_prefect.api.guard as guard

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(guard.hmac, "compare_digest", recording)
    api.store.create_task(Task(id="t"))
    near = api.token[:-1] + ("A" if api.token[-1] != "A" else "B")
    with httpx.Client(base_url=api.url) as client:
        assert client.get("/api/v1/tasks/t", headers={"Authorization": f"Bearer {near}"}).status_code == 401
        assert client.get("/api/v1/tasks/t", headers={"Authorization": f"Bearer {api.token}"}).status_code == 200
    assert (near.encode(), api.token.encode()) in compared and (api.token.encode(), api.token.encode()) in compared
