"""The keruta-task flow end to end on the local backend (agent subprocess, embedded API, SQLite)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client

from keruta_prefect.cli import main
from keruta_prefect.flows import KerutaTaskFailed, keruta_task
from keruta_prefect.models import Task
from keruta_prefect.store import Store
from tests.waiting import Gate, eventually

pytestmark = pytest.mark.usefixtures("prefect_server")
ROOT = Path(__file__).resolve().parent.parent


def markdown_artifact(key: str) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert artifacts, key
    return str(artifacts[0].data)


def test_a_task_spec_runs_to_completed_with_logs_run_record_and_artifacts(store: Store) -> None:
    spec = {"id": "e2e-ok", "title": "end to end", "additionalEnv": {"WHO": "flow"},
            "script": "echo \"hello $WHO\"\nkeruta-agent progress 80\nmkdir -p $KERUTA_ARTIFACTS_DIR/sub\n"
                      "echo data > $KERUTA_ARTIFACTS_DIR/sub/out.txt\necho bye"}
    result = keruta_task(task_spec=spec)
    assert (result.status, result.exit_code, result.attempt, result.log_lines) == ("COMPLETED", 0, 1, 2)
    assert [a.path for a in result.artifacts] == ["sub/out.txt"]
    assert Path(result.artifacts[0].location).read_text() == "data\n"

    task = store.get_task("e2e-ok")
    assert (task.status, task.progress) == ("COMPLETED", 80)
    [run] = store.runs("e2e-ok")
    assert (run.status, run.exit_code, run.backend, run.attempt) == ("COMPLETED", 0, "local", 1)
    assert run.flow_run_id and run.finished_at is not None
    assert [row.message for row in store.logs("e2e-ok")] == ["hello flow", "bye"]
    assert [a.path for a in store.artifacts("e2e-ok")] == ["sub/out.txt"]

    summary = markdown_artifact("keruta-e2e-ok")
    assert "**COMPLETED**" in summary and "hello flow" in summary
    table = markdown_artifact("keruta-e2e-ok-files")  # the files, as a table artifact on the flow run
    assert "sub/out.txt" in table and result.artifacts[0].sha256 in table


def test_a_failing_script_fails_the_flow_run_with_the_exit_code_and_no_retry(store: Store) -> None:
    state = keruta_task(task_spec={"id": "e2e-fail", "script": "echo trying\nexit 7"}, return_state=True)
    assert state.is_failed()
    with pytest.raises(KerutaTaskFailed) as info:
        state.result()
    result = info.value.result
    assert (result.status, result.reason, result.exit_code) == ("FAILED", "SCRIPT_EXIT_7", 1)
    assert str(info.value) == "keruta task e2e-fail FAILED (exit code 1): SCRIPT_EXIT_7: script exited with code 7"
    assert len(store.runs("e2e-fail")) == 1  # a task failure is not retried
    assert store.get_task("e2e-fail").status == "FAILED"


def test_a_system_failure_gets_a_new_attempt(store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "first-attempt-done"
    script = (f'if [ ! -e "{marker}" ]; then touch "{marker}"; echo "killing my agent"; kill -9 $PPID; sleep 5; fi\n'
              "echo recovered")
    result = keruta_task(task_spec={"id": "e2e-retry", "script": script})
    assert (result.status, result.attempt) == ("COMPLETED", 2)
    first, second = store.runs("e2e-retry")
    # The same reason the Kubernetes backend gives for an agent killed by a signal; the message names it.
    assert (first.status, first.reason, first.exit_code) == ("FAILED", "AGENT_KILLED", 137)
    assert "SIGKILL" in (first.message or "")
    assert (second.status, second.attempt) == ("COMPLETED", 2)
    assert "recovered" in [row.message for row in store.logs("e2e-retry")]


def test_a_stored_task_runs_by_id_and_a_failed_one_can_run_again(store: Store, tmp_path: Path) -> None:
    flag = tmp_path / "ok"
    store.create_task(Task.model_validate({"id": "by-id", "script": f'test -e "{flag}" && echo fixed'}))
    assert keruta_task(task_id="by-id", return_state=True).is_failed()
    flag.touch()
    assert keruta_task(task_id="by-id").status == "COMPLETED"
    assert [r.status for r in store.runs("by-id")] == ["FAILED", "COMPLETED"]


def test_cli_run_prints_the_log_lines_and_the_final_status(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--task-file", str(ROOT / "examples" / "hello.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("COMPLETED task ") and "(attempt 1, exit code 0," in out
    task_id = out.split()[2]
    assert store.get_task(task_id).status == "COMPLETED" and store.get_task(task_id).progress == 50
    assert [r.message for r in store.logs(task_id)][-1] == "done"
    assert [a.path for a in store.artifacts(task_id)] == ["uname.txt"]
    assert main(["run", "--task-file", str(ROOT / "examples" / "hello.json")]) == 0  # the demo runs again
    assert capsys.readouterr().out.split()[2] != task_id

    failing = tmp_path / "fail.json"
    failing.write_text(json.dumps({"id": "cli-fail", "script": "exit 4"}))
    assert main(["run", "--task-file", str(failing)]) == 1
    assert "FAILED task cli-fail (attempt 1, exit code 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "keruta-prefect: --task-file='{path}': No such file or directory"),
        ("{bad json", "keruta-prefect: {path}: not valid JSON"),
        ('{"additionalEnv": {"A-B": "1"}}', "keruta-prefect: {path}: additionalEnv={{'A-B': '1'}}: 'A-B': "),
    ],
)
def test_cli_run_rejects_bad_input_with_one_line_and_exit_2(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "task.json"
    if content is not None:
        path.write_text(content)
    assert main(["run", "--task-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(path=path)), err
    assert err.count("\n") == 1 and store.list_tasks() == []


def test_a_completed_task_is_not_run_again_and_its_recorded_result_is_returned(store: Store) -> None:
    first = keruta_task(task_spec={"id": "once", "script": "echo only once"})
    again = keruta_task(task_id="once")
    assert again.status == "COMPLETED" and again.started_at == first.started_at
    assert len(store.runs("once")) == 1 and store.count_logs("once") == 1


def test_cancel_hook_stops_the_agents_of_a_flow_run_found_by_its_id(store: Store) -> None:
    """What on_cancellation does in the runner process: no in-memory handle, only the run records."""
    from keruta_prefect.backends.base import RunContext
    from keruta_prefect.backends.local import LocalBackend, session_processes
    from keruta_prefect.blocks import load_settings
    from keruta_prefect.flows import stop_flow_run_agents
    from keruta_prefect.store import TaskRunRow

    task = store.create_task(Task.model_validate({"id": "long", "script": "echo started\nsleep 300"}))
    backend = LocalBackend(load_settings(), store)
    handle = backend.launch(task, RunContext(flow_run_id="flow-run-123", attempt=1))
    store.start_run(TaskRunRow(task_id="long", flow_run_id="flow-run-123", pid=handle.pid, job_name=handle.name))
    eventually(lambda: store.count_logs("long") > 0, what="the script's first line")

    assert stop_flow_run_agents("flow-run-123") == ["long"]
    assert store.get_task("long").status == "CANCELLED"
    [run] = store.runs("long")
    assert (run.status, run.finished_at is not None) == ("CANCELLED", True)
    assert session_processes(handle.pid) == []  # the agent, the script and the script's `sleep` are gone
    assert stop_flow_run_agents("flow-run-123") == []  # nothing left to stop


def test_a_hostile_link_in_the_work_directory_loses_the_artifacts_but_not_the_task(store: Store) -> None:
    script = "ln -s /etc/passwd $KERUTA_ARTIFACTS_DIR/passwd\necho fine > $KERUTA_ARTIFACTS_DIR/ok.txt"
    result = keruta_task(task_spec={"id": "e2e-hostile", "script": script})
    assert result.status == "COMPLETED" and result.artifacts == []
    assert result.artifacts_note is not None and result.artifacts_note.startswith("artifacts lost: unsafe entry")


def progress_artifacts(key: str) -> list[tuple[uuid.UUID, float]]:
    """Every artifact stored under ``key``, as (id, value)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return [(a.id, float(str(a.data))) for a in artifacts]


def test_a_progress_artifact_follows_the_agent_while_it_runs(store: Store, tmp_path: Path) -> None:
    """The script holds each value until the test has seen it in the artifact: no value can be missed
    between two polls of the flow's progress thread, and it must be seen while the task still runs."""
    import threading

    at_30, at_70 = Gate(tmp_path / "at-30"), Gate(tmp_path / "at-70")
    spec = {"id": "e2e-progress",
            "script": f"keruta-agent progress 30\n{at_30.wait}\nkeruta-agent progress 70\n{at_70.wait}"}
    results: list[object] = []
    runner = threading.Thread(target=lambda: results.append(keruta_task(task_spec=spec)), daemon=True)
    runner.start()

    def shows(value: float) -> Callable[[], list[tuple[uuid.UUID, float]]]:
        def check() -> list[tuple[uuid.UUID, float]]:
            artifacts = progress_artifacts("keruta-e2e-progress-progress")
            assert [v for _, v in artifacts] == [value], artifacts
            return artifacts
        return check

    with at_30, at_70:
        [(first, _)] = eventually(shows(30.0), what="the artifact to show 30 while the task runs", interval=0.2)
        assert store.get_task("e2e-progress").progress == 30  # what the agent reported
        at_30.open()
        [(second, _)] = eventually(shows(70.0), what="the artifact to show 70 while the task runs", interval=0.2)
        assert second == first  # updated in place, not a second artifact
        at_70.open()
        [result] = eventually(lambda: results, what="the task to end")
    assert result.status == "COMPLETED"  # type: ignore[attr-defined]
    assert progress_artifacts("keruta-e2e-progress-progress") == [(first, 70.0)]  # the final value


def test_a_failed_task_emits_a_keruta_event_with_the_task_and_the_reason(store: Store) -> None:
    import httpx
    from prefect.settings import PREFECT_API_URL

    keruta_task(task_spec={"id": "e2e-event", "title": "evented", "script": "exit 9"}, return_state=True)
    query = {"filter": {"event": {"name": ["keruta.task.failed"]},
                        "resource": {"id": ["keruta.task.e2e-event"]},
                        "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 10}

    def events() -> list[dict[str, Any]]:
        response = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=query)
        response.raise_for_status()
        return response.json()["events"]  # type: ignore[no-any-return]

    # Events reach the server asynchronously.
    [event] = eventually(events, what="the keruta.task.failed event to reach the Prefect server", interval=0.5)
    assert event["resource"]["prefect.resource.name"] == "evented"
    assert event["resource"]["keruta.task.id"] == "e2e-event"
    assert event["payload"]["status"] == "FAILED" and event["payload"]["reason"] == "SCRIPT_EXIT_9"


@pytest.mark.parametrize("failures", [2, 100])
def test_a_database_outage_at_record_time_is_retried_then_fails_loudly_keeping_the_outcome(
        store: Store, monkeypatch: pytest.MonkeyPatch, failures: int) -> None:
    """SQLite answering "database is locked" when the run is recorded: record-run retries; if the database
    stays away, the flow run fails with one line and the outcome is kept in a Prefect artifact."""
    from sqlalchemy.exc import OperationalError

    original = Store.update_run
    left = {"n": failures}

    def locked(self: Store, run_id: int, **changes: object) -> object:
        if "finished_at" in changes and left["n"] > 0:
            left["n"] -= 1
            raise OperationalError("UPDATE keruta_task_runs", {}, Exception("database is locked"))
        return original(self, run_id, **changes)

    monkeypatch.setattr(Store, "update_run", locked)
    task_id = f"db-out-{failures}"
    state = keruta_task(task_spec={"id": task_id, "script": "echo done"}, return_state=True)
    if failures == 2:
        assert state.is_completed()
        assert store.runs(task_id)[-1].finished_at is not None
        return
    assert state.is_failed()
    assert state.message == (f"keruta task {task_id} ended COMPLETED but the database did not take the result "
                             f"(database is locked); the outcome is kept in artifact keruta-{task_id}-unrecorded")
    with pytest.raises(KerutaTaskFailed) as info:
        state.result()
    assert (info.value.result.status, info.value.result.exit_code) == ("COMPLETED", 0)
    kept = markdown_artifact(f"keruta-{task_id}-unrecorded")
    assert '"status": "COMPLETED"' in kept and '"exit_code": 0' in kept
    assert store.get_task(task_id).status == "COMPLETED"  # the agent's own report went through the API
