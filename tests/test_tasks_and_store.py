"""Task specs, status transitions and the SQLModel store."""

from __future__ import annotations

import threading

import pytest

from keruta_prefect.manifest import task_env, truncate_utf8
from keruta_prefect.models import (
    InvalidTransition,
    Task,
    TaskSpecError,
    TaskStatus,
    check_transition,
    parse_task_spec,
)
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import LogLine, Store, TaskExists, TaskNotFound, TaskRunRow
from keruta_prefect.store.database import _engines, add_missing_columns

S = TaskStatus


@pytest.fixture
def store(any_store: Store) -> Store:
    """Every store test here runs on SQLite and on PostgreSQL."""
    return any_store


def test_spec_in_the_originals_camel_case_with_script_as_a_string() -> None:
    task = parse_task_spec('{"id": "t-1", "title": "T", "priority": 5, "parentId": "root", '
                           '"additionalEnv": {"A_B": "1"}, "repositoryId": "r", "script": "echo hi"}')
    assert (task.id, task.priority, task.parent_id, task.additional_env) == ("t-1", 5, "root", {"A_B": "1"})
    assert task.script is not None and task.script.content == "echo hi"
    assert task.script.runnable() == "#!/bin/sh\necho hi"  # the agent execs the file: it needs a #! line


def test_spec_with_the_script_object_form() -> None:
    task = parse_task_spec({"title": "x", "script": {"content": "print(1)", "language": "python",
                                                     "filename": "main.py", "parameters": {"n": "3"}}})
    assert task.script is not None
    assert task.script.filename == "main.py"
    assert task.script.runnable().startswith("#!/usr/bin/env python3\n")
    assert len(task.id) == 32  # generated when the spec has none


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ('{"additionalEnv": {"1BAD": "x"}}', "additionalEnv={'1BAD': 'x'}: '1BAD': environment variable names"),
        ('{"additionalEnv": {"KERUTA_API_TOKEN": "x"}}', "KERUTA_* variables are set by keruta itself"),
        ('{"image": "UPPER/Case Image"}', "image='UPPER/Case Image': must be an image reference"),
        ('{"namespace": "Bad_NS"}', "namespace='Bad_NS': must be a DNS-1123 label"),
        ('{"priority": "high"}', "priority='high': expected a whole number"),
        ('{"timeoutSeconds": -4}', "timeoutSeconds=-4: must be at least 1"),
        ('{"id": "../etc"}', "id='../etc': task ids are 1-512 characters"),
        ('{"script": {"content": "x", "filename": "../x.sh"}}', "script.filename='../x.sh': must be a plain file"),
        ('{"resources": {"cpuLimit": "lots"}}', "resources.cpuLimit='lots': expected a Kubernetes quantity"),
        ('{"title": "a\\u0000b"}', "title='a\\x00b': must not contain NUL"),
        ('{"tittle": "typo"}', "tittle: unknown field"),
        ("[1, 2]", "a task spec is a JSON object, got list"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_specs_are_one_line_naming_field_and_value(spec: str, message: str) -> None:
    with pytest.raises(TaskSpecError) as info:
        parse_task_spec(spec, source="task.json")
    text = str(info.value)
    assert text.startswith("task.json: ") and message in text, text
    assert "\n" not in text


def test_uppercase_underscore_and_long_ids_are_valid_task_ids() -> None:
    assert parse_task_spec({"id": "Task_ABC.1"}).id == "Task_ABC.1"
    assert parse_task_spec({"id": "a" * 300}).id == "a" * 300


@pytest.mark.parametrize(
    ("current", "new", "ok"),
    [
        (S.PENDING, S.IN_PROGRESS, True),
        (S.IN_PROGRESS, S.COMPLETED, True),
        (S.IN_PROGRESS, S.IN_PROGRESS, True),  # progress updates
        (S.COMPLETED, S.IN_PROGRESS, False),
        (S.COMPLETED, S.FAILED, False),
        (S.CANCELLED, S.COMPLETED, False),
        (S.FAILED, S.PENDING, True),  # a deliberate rerun
        (S.PENDING, S.COMPLETED, False),
    ],
)
def test_transitions(current: TaskStatus, new: TaskStatus, ok: bool) -> None:
    if ok:
        check_transition(current, new)
    else:
        with pytest.raises(InvalidTransition, match=f"cannot move a task from {current} to {new}"):
            check_transition(current, new)


def test_store_round_trip_and_duplicate_ids(store: Store) -> None:
    task = parse_task_spec({"id": "round", "title": "Ü title", "documents": ["d1"], "script": "echo"})
    store.create_task(task)
    again = store.get_task("round")
    assert again.title == "Ü title" and again.documents == ["d1"] and again.script == task.script
    with pytest.raises(TaskExists, match="task 'round' already exists"):
        store.create_task(task)
    with pytest.raises(TaskNotFound, match="task 'nope' not found"):
        store.get_task("nope")


def test_status_message_never_overwrites_the_description(store: Store) -> None:
    store.create_task(Task(id="d", description="the real description"))
    store.set_status("d", S.IN_PROGRESS, message="step 1 of 3", progress=10)
    task = store.set_status("d", S.COMPLETED, message="all done")
    assert task.description == "the real description"
    assert task.message == "all done"


def test_invalid_transition_leaves_the_task_as_it_was(store: Store) -> None:
    store.create_task(Task(id="final"))
    store.set_status("final", S.IN_PROGRESS)
    store.set_status("final", S.COMPLETED, message="ok")
    with pytest.raises(InvalidTransition):
        store.set_status("final", S.IN_PROGRESS, message="zombie")
    task = store.get_task("final")
    assert (task.status, task.message) == (S.COMPLETED, "ok")


def test_log_lines_are_stored_once_per_source_and_seq(store: Store) -> None:
    store.create_task(Task(id="logs"))
    lines = [LogLine(seq=i, message=f"line {i}") for i in range(5)]
    assert store.add_logs("logs", "agent-a", lines) == 5
    assert store.add_logs("logs", "agent-a", [*lines[3:], LogLine(seq=5, message="line 5")]) == 1
    assert store.add_logs("logs", "agent-b", lines[:1]) == 1  # another agent session numbers its own lines
    assert [row.message for row in store.logs("logs")] == [f"line {i}" for i in range(6)] + ["line 0"]


def test_concurrent_status_writers_cannot_both_win(store: Store) -> None:
    """Two writers race to finish a task differently: exactly one final status is accepted."""
    for n in range(10):
        store.create_task(Task(id=f"race-{n}"))
        store.set_status(f"race-{n}", S.IN_PROGRESS)
        outcomes: list[str] = []

        def finish(status: TaskStatus, n: int = n, outcomes: list[str] = outcomes) -> None:
            try:
                store.set_status(f"race-{n}", status)
                outcomes.append(f"ok {status}")
            except InvalidTransition:
                outcomes.append("refused")

        threads = [threading.Thread(target=finish, args=(s,)) for s in (S.COMPLETED, S.CANCELLED)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(o.split()[0] for o in outcomes) == ["ok", "refused"]


def test_truncate_utf8_cuts_on_a_character_boundary_with_a_marker() -> None:
    text = "é" * 100  # 200 bytes
    cut = truncate_utf8(text, 101, marker="[…]")
    assert cut.endswith("[…]")
    assert len(cut.encode()) <= 101
    assert cut[:-3] == "é" * ((101 - len("[…]".encode())) // 2)
    assert truncate_utf8("short", 10) == "short"


def test_task_env_is_the_originals_mapping() -> None:
    task = parse_task_spec({"id": "env", "title": "T", "description": "x" * 10000, "priority": 3,
                            "repositoryId": "repo", "documents": ["doc"], "additionalEnv": {"FOO": "bar"}})
    env = task_env(task, KerutaSettings(description_env_limit=256))
    assert env["KERUTA_TASK_ID"] == "env" and env["KERUTA_TASK_PRIORITY"] == "3"
    assert env["KERUTA_TASK_STATUS"] == "PENDING" and "FOO" not in env  # callers add additionalEnv last
    assert env["KERUTA_REPOSITORY_ID"] == "repo" and env["KERUTA_DOCUMENT_ID"] == "doc"
    assert len(env["KERUTA_TASK_DESCRIPTION"].encode()) <= 256
    assert env["KERUTA_TASK_DESCRIPTION"].endswith("full text: GET /api/v1/tasks/env]")
    assert "T" in env["KERUTA_TASK_CREATED_AT"] and "KERUTA_API_TOKEN" not in env


ADDED_SINCE_THE_LAST_RELEASE = ["keruta_task_runs.resources", "keruta_task_runs.timeout_seconds",
                                "keruta_task_runs.usage", "keruta_tasks.usage"]


def test_a_database_an_earlier_version_created_gains_the_new_columns_and_keeps_its_rows(any_store: Store) -> None:
    """The columns added later (the runs' resources, timeout and usage, the tasks' usage) are added to an
    existing database on start; the task and run stored before are still there, unchanged (SQLite and
    PostgreSQL)."""
    url = any_store.engine.url.render_as_string(hide_password=False)
    any_store.create_task(Task(id="kept", title="stored before the upgrade"))
    any_store.start_run(TaskRunRow(task_id="kept", attempt=1, job_name="keruta-kept-1"))

    def as_the_earlier_version_left_it() -> None:
        with any_store.engine.begin() as conn:
            for added in ADDED_SINCE_THE_LAST_RELEASE:
                table, column = added.split(".")
                conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")

    as_the_earlier_version_left_it()
    assert sorted(add_missing_columns(any_store.engine)) == ADDED_SINCE_THE_LAST_RELEASE
    assert add_missing_columns(any_store.engine) == []  # twice is nothing
    as_the_earlier_version_left_it()  # …and now the store's own start must add them
    _engines.pop(url).dispose()
    upgraded = Store(url)
    assert upgraded.get_task("kept").title == "stored before the upgrade"
    [run] = upgraded.runs("kept")
    assert (run.job_name, run.resources, run.usage) == ("keruta-kept-1", None, None)
    upgraded.update_run(run.id or 0, usage={"cpuSeconds": 1.5})
    assert upgraded.runs("kept")[0].usage == {"cpuSeconds": 1.5}


def test_a_fractional_byte_size_rounds_up_never_to_zero() -> None:
    """A memory limit of 500m (half a byte, as odd as it is) is 1 byte, as Kubernetes rounds it: never 0."""
    from keruta_prefect.validation import parse_byte_size

    assert [parse_byte_size(v) for v in ("500m", "1.5", "128Mi", 7, "0.5Ki")] == [1, 2, 128 * 2**20, 7, 512]
