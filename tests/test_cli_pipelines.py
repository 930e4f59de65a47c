"""`keruta-prefect tasks add | dispatch | pipeline` and the --json outputs, as a shell user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keruta_prefect.cli import main
from keruta_prefect.store import Store

pytestmark = pytest.mark.usefixtures("prefect_server")


def write(path: Path, data: object) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_tasks_add_then_dispatch_runs_them_by_priority(store: Store, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks", "add", "--task-file", write(tmp_path / "a.json", {"id": "cli-a", "priority": 1,
                                                                            "script": "echo a"})]) == 0
    assert main(["tasks", "add", "--json", "--task-file",
                 write(tmp_path / "b.json", {"id": "cli-b", "priority": 7, "script": "echo b"})]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "cli-a\tPENDING\tpriority 1\t"
    assert json.loads(out.split("\n", 1)[1])["id"] == "cli-b"

    assert main(["dispatch", "--max-tasks", "1", "--concurrency-limit", "", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["claimed"] == ["cli-b"] and result["runs"][0]["status"] == "COMPLETED"
    assert store.get_task("cli-a").status == "PENDING"
    assert main(["dispatch", "--concurrency-limit", ""]) == 0
    assert capsys.readouterr().out.splitlines() == ["COMPLETED\tcli-a", "1 tasks dispatched"]


def test_pipeline_command_prints_every_run_and_exits_1_when_one_failed(store: Store, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    file = write(tmp_path / "p.json", {"parent": {"id": "cp-root", "script": "echo root"},
                                       "children": [{"id": "cp-ok", "script": "true"},
                                                    {"id": "cp-bad", "script": "exit 4"}]})
    assert main(["pipeline", "--file", file, "--concurrency-limit", ""]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["COMPLETED\tcp-root", "COMPLETED\tcp-ok"]
    assert lines[2].startswith("FAILED\tcp-bad\tkeruta task cp-bad FAILED")
    assert lines[3] == "2 COMPLETED, 1 FAILED"


@pytest.mark.parametrize(("argv", "content", "message"), [
    (["tasks", "add", "--task-file", "{f}"], {"id": "x", "priority": "high"}, "priority"),
    (["tasks", "add", "--task-file", "{f}"], None, "--task-file="),
    (["pipeline", "--file", "{f}"], {"children": [{"id": "ok"}, {"timeoutSeconds": -1}]}, "children[1]"),
    (["pipeline", "--file", "{f}"], {"kids": []}, "expected an object with 'parent' and/or 'children'"),
    (["pipeline", "--file", "{f}", "--concurrency", "0"], {"children": []}, "--concurrency=0: must be between"),
    (["dispatch", "--max-tasks", "0"], None, "--max-tasks=0: must be between 1 and 1000"),
])
def test_bad_input_ends_with_one_line_naming_it_and_stores_nothing(
        store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], content: object,
        message: str) -> None:
    path = tmp_path / "input.json"
    if content is not None:
        path.write_text(json.dumps(content))
    code = main([a.replace("{f}", str(path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message in err and len(err.splitlines()) == 1, err
    assert store.list_tasks() == []


def test_adding_an_existing_id_is_refused_and_the_stored_task_is_kept(store: Store, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks", "add", "--task-file", write(tmp_path / "a.json", {"id": "dup", "title": "first"})]) == 0
    assert main(["tasks", "add", "--task-file", write(tmp_path / "b.json", {"id": "dup", "title": "second"})]) == 2
    assert "task 'dup' already exists" in capsys.readouterr().err
    assert store.get_task("dup").title == "first"
