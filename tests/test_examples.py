"""The documented composition example runs and uses the keruta task's result."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from keruta_prefect.store import Store
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("prefect_server")


def load_example(name: str) -> object:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_user_flow_mixes_a_keruta_task_with_prefect_tasks_and_uses_its_artifacts(store: Store) -> None:
    example = load_example("compose")
    summary = example.nightly_report(topic="pipelines")  # type: ignore[attr-defined]
    [task] = store.list_tasks()
    assert summary.startswith(f"{task.id}: COMPLETED after ")
    assert "files: report.md (12 bytes, sha256 " in summary
    [artifact] = store.artifacts(task.id)
    assert Path(artifact.location).read_text() == "# pipelines\n"
    assert [row.message for row in store.logs(task.id)] == ["writing about pipelines"]


def test_the_example_reports_a_failed_task_through_its_result(store: Store) -> None:
    example = load_example("compose")
    spec_task = example.build_spec  # type: ignore[attr-defined]
    original = spec_task.fn

    def broken(topic: str) -> dict[str, object]:
        spec = original(topic)
        spec["script"] = "exit 5"
        return spec

    spec_task.fn = broken
    try:
        summary = example.nightly_report()  # type: ignore[attr-defined]
    finally:
        spec_task.fn = original
    assert summary == "the report failed: SCRIPT_EXIT_5: script exited with code 5"
