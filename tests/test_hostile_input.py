"""Hostile input beyond the per-module cases (see docs/reliability.md for the whole table): each is
refused in one line naming the field and the value, or accepted harmlessly; what is stored stays intact."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from keruta_prefect.cli import main
from keruta_prefect.models import Task, parse_task_spec
from keruta_prefect.store import Store
from tests.conftest import Api


def test_a_huge_property_value_is_named_in_one_short_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "app.properties"
    path.write_text("keruta.kubernetes.default-namespace=" + "a" * 100_000 + "\n")
    assert main(["settings", "show", "--properties", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keruta-prefect: keruta.kubernetes.default-namespace='aaaa")
    assert "must be a DNS-1123 label" in err and err.count("\n") == 1 and len(err) < 400


def test_a_50_kb_description_with_control_characters_and_emoji_is_stored_intact(api: Api) -> None:
    line = "line one\twith a tab\r\nand ANSI \x1b[31mred\x1b[0m and a bell \x07 and emoji 🚀🧪\n"
    description = (line * 700)[:50_000]
    title = "deploy 🚀 `prod` $(whoami) ; rm -rf / | cat && echo"
    with httpx.Client(base_url=api.url, headers=api.headers) as http:
        response = http.post("/api/v1/tasks", json={"id": "big-desc", "title": title, "description": description})
        assert response.status_code in (200, 201), response.text
        stored = http.get("/api/v1/tasks/big-desc").json()
    assert stored["description"] == description and stored["title"] == title
    assert len(description.encode()) > 50_000


@pytest.mark.usefixtures("prefect_server")
def test_shell_metacharacters_in_title_and_description_are_never_run_by_a_shell(
        store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = f"$(touch {marker}) `touch {marker}`; touch {marker} | touch {marker} && touch {marker}"
    from keruta_prefect.flows import keruta_task

    result = keruta_task(task_spec={"id": "meta", "title": hostile, "description": hostile,
                                    "script": 'printf "%s\\n" "$KERUTA_TASK_TITLE"'})
    assert result.status == "COMPLETED"
    assert [row.message for row in store.logs("meta")] == [hostile]  # the value, as text
    assert not marker.exists()


def test_a_negative_priority_is_a_low_priority_not_an_error(store: Store) -> None:
    store.create_task(parse_task_spec({"id": "low", "priority": -5}))
    store.create_task(parse_task_spec({"id": "normal"}))
    assert [task.id for task, _ in store.pending()] == ["normal", "low"]


def test_an_upload_over_the_caps_is_413_and_nothing_is_stored(store: Store, keruta_home: Path) -> None:
    from keruta_prefect.api import ApiServer, create_app

    store.create_task(Task(id="up"))
    server = ApiServer(create_app(store, "tok", artifacts_root=keruta_home / "a", max_file_size=1024,
                                  max_total_size=4096)).start()
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer tok"}) as http:
            huge = http.post("/api/v1/tasks/up/artifacts", files={"file": ("big.bin", b"x" * (3 * 2**20))})
            assert huge.status_code == 413 and "over the" in huge.json()["detail"]
            over = http.post("/api/v1/tasks/up/artifacts", files={"file": ("f.bin", b"x" * 2000)})
            assert over.status_code == 413 and "'f.bin' is over the 1024-byte file cap" in over.json()["detail"]
    finally:
        server.stop()
    assert store.artifacts("up") == []
    assert not any((keruta_home / "a").rglob("*.bin"))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("timeoutSeconds", 0, "timeoutSeconds=0: must be at least 1"),
    ("id", "a" * 513, "task ids are 1-512 characters"),
    ("image", "registry.example/app:tag with space", "must be an image reference"),
    ("namespace", "-starts-with-dash", "must be a DNS-1123 label"),
    ("additionalEnv", {"PATH WITH SPACE": "x"}, "environment variable names must match"),
    ("resources", {"memoryLimit": "12 parsecs"}, "expected a Kubernetes quantity"),
])
def test_more_bad_spec_fields_are_named_with_their_value(field: str, value: object, message: str) -> None:
    from keruta_prefect.models import TaskSpecError

    with pytest.raises(TaskSpecError) as info:
        parse_task_spec({"id": "x", field: value} if field != "id" else {field: value}, source="spec")
    text = str(info.value)
    assert message in text and "\n" not in text
    assert field in text or field == "id"
