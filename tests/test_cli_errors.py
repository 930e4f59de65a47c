"""`keruta-prefect` never shows a user a bare traceback: bad input is one line naming the field and the
value (exit 2), anything unexpected is one line pointing at --debug / KERUTA_DEBUG (exit 4).

The CLI runs as a real process (the venv's `keruta-prefect`, with a fresh KERUTA_HOME and PREFECT_HOME);
commands that need Prefect talk to the session's Prefect server. Also here: the first run's temporary
Prefect server gets a generous startup time, seeding is create-if-absent under a race, and the task
description's truncation marker never pushes it past its byte limit.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keruta_harness.processes import free_port

from keruta_prefect.manifest import TRUNCATION_MARKER, task_env, truncate_utf8
from keruta_prefect.models import Task
from keruta_prefect.settings import KerutaSettings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "keruta-prefect"


@pytest.fixture
def homes(tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh user: own KERUTA_HOME and PREFECT_HOME, no keruta or Prefect API settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KERUTA_", "PREFECT_API_", "PREFECT_SERVER_EPHEMERAL"))}
    env.update(KERUTA_HOME=str(tmp_path / "keruta-home"), PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(ROOT))
    return env


def cli(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], env={**env, **extra}, capture_output=True, text=True, timeout=240,
                          cwd=ROOT)


def one_line(result: subprocess.CompletedProcess[str], code: int, *names: str) -> str:
    """Exit ``code``, stderr exactly one line containing each of ``names``, no traceback."""
    err = result.stderr
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    for name in names:
        assert name in err, (name, err)
    return err


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the test runs (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"id": "cli-errors", "script": "echo hi"}))
    return path


# --- settings files ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "names"), [
    ("a=1\n# note\nb=x\\\n  continued\nkeruta.kubernetes.default-image=agent\\u12zz\n",
     ["line 5", "keruta.kubernetes.default-image=agent\\u12zz", "\\u12zz"]),
    ("keruta.kubernetes.context=\\ud800\n", ["keruta.kubernetes.context='\\ud800'"]),
    ("keruta.kubernetes.api-port=\\uzzzz\n", ["line 1", "keruta.kubernetes.api-port=\\uzzzz"]),
])
def test_a_bad_properties_file_is_one_line_naming_the_line_key_and_value(
    homes: dict[str, str], tmp_path: Path, text: str, names: list[str]
) -> None:
    path = tmp_path / "application.properties"
    path.write_text(text)
    for command in (["settings", "show"], ["render", "--task-file", str(ROOT / "examples" / "hello.json")]):
        one_line(cli(homes, *command, "--properties", str(path)), 2, str(path), *names)


# --- the task database --------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "names"), [
    ("notaurl", ["KERUTA_DATABASE_URL='notaurl'", "not a database URL"]),
    ("foo://x/y", ["KERUTA_DATABASE_URL='foo://x/y'", "unknown kind of database 'foo'"]),
    ("postgresql+psycopg://u:secret@h:abc/db", ["KERUTA_DATABASE_URL='postgresql+psycopg://u:***@h:abc/db'"]),
    ("mysql://u:secret@h/db", ["KERUTA_DATABASE_URL='mysql://u:***@h/db'", "driver is not installed"]),
    ("sqlite:////nonexistent-dir/sub/keruta.db", ["KERUTA_DATABASE_URL='sqlite:////nonexistent-dir/sub/keruta.db'",
                                                  "unable to open database file"]),
])
def test_a_database_url_that_cannot_work_is_one_line_naming_it_without_the_password(
    homes: dict[str, str], task_file: Path, url: str, names: list[str]
) -> None:
    for command in (["tasks", "list"], ["tasks", "logs", "some-id"], ["tasks", "add", "--task-file", str(task_file)],
                    ["run", "--task-file", str(task_file)]):
        err = one_line(cli(homes, *command, KERUTA_DATABASE_URL=url), 2, *names)
        assert "secret" not in err


def test_a_postgresql_server_that_is_down_and_a_file_that_is_no_database_are_one_line(
    homes: dict[str, str], tmp_path: Path, refused_port: int
) -> None:
    url = f"postgresql+psycopg://keruta:secret@127.0.0.1:{refused_port}/keruta"
    err = one_line(cli(homes, "tasks", "list", KERUTA_DATABASE_URL=url), 2,
                   f"KERUTA_DATABASE_URL='postgresql+psycopg://keruta:***@127.0.0.1:{refused_port}/keruta'",
                   "Connection refused")
    assert "secret" not in err
    not_a_db = tmp_path / "keruta.db"
    not_a_db.write_text("not a database\n" * 100)
    one_line(cli(homes, "tasks", "list", KERUTA_DATABASE_URL=f"sqlite:///{not_a_db}"), 2,
             f"KERUTA_DATABASE_URL='sqlite:///{not_a_db}'", "file is not a database")


def test_a_keruta_home_that_cannot_be_a_directory_is_one_line(homes: dict[str, str], tmp_path: Path) -> None:
    file = tmp_path / "a-file"
    file.write_text("")
    one_line(cli(homes, "tasks", "list", KERUTA_HOME=str(file / "home")), 2, f"KERUTA_HOME='{file / 'home'}'")


# --- options ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "names"), [
    (["tasks", "list", "--limit", "0"], ["--limit=0"]),
    (["tasks", "list", "--limit", "many"], ["--limit", "'many'"]),
    (["render", "--task-file", "examples/hello.json", "--attempt", "-1"], ["--attempt=-1"]),
    (["api", "--port", "70000"], ["--port=70000"]),
    (["api", "--host", "192.0.2.1", "--port", "8080"], ["--host='192.0.2.1'", "cannot listen there"]),
    (["blocks", "seed", "--name", "Not A Name"], ["--name='Not A Name'"]),
    (["doctor", "--settings-block", "UPPER"], ["--settings-block='UPPER'"]),
    (["run", "--task-file", "examples/hello.json", "--settings-block", "a/b"], ["--settings-block='a/b'"]),
    (["dispatch", "--concurrency-limit", "a/b"], ["--concurrency-limit='a/b'"]),
    (["pipeline", "--file", "nope.json"], ["--file='nope.json'"]),
    (["settings", "keys", "--format", "yaml"], ["--format", "'yaml'"]),
    ([], ["command"]),
])
def test_bad_options_are_one_line_naming_the_option_and_value(
    homes: dict[str, str], args: list[str], names: list[str]
) -> None:
    one_line(cli(homes, *args, KERUTA_API_TOKEN="t"), 2, *names)


@pytest.mark.parametrize(("command", "spec", "names"), [
    ("add", {"id": "big", "priority": 10**23}, ["priority", "100000000000000000000000"]),
    ("add", {"id": "big", "timeoutSeconds": 10**23}, ["timeoutSeconds"]),
    ("render", {"id": "big", "timeoutSeconds": 10**23}, ["timeoutSeconds"]),
    ("add", {"id": "nul", "session": "a\u0000b"}, ["session", "NUL"]),
])
def test_numbers_out_of_range_and_nul_in_a_task_file_are_one_line(
        homes: dict[str, str], tmp_path: Path, command: str, spec: dict[str, object], names: list[str]) -> None:
    path = tmp_path / "task.json"
    path.write_text(json.dumps({**spec, "script": "true"}))
    args = ["tasks", "add", "--task-file", str(path)] if command == "add" else ["render", "--task-file", str(path)]
    one_line(cli(homes, *args), 2, *names)


def test_an_unexpected_error_is_one_line_exit_4_and_debug_shows_the_traceback(homes: dict[str, str]) -> None:
    code = ("import sys, keruta_prefect.cli as cli, keruta_prefect.cli.operate as operate\n"
            "def boom(args): raise ZeroDivisionError('division by zero')\n"
            "operate.cmd_settings_keys = boom\nraise SystemExit(cli.main(sys.argv[1:]))\n")
    base = [sys.executable, "-c", code]

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], env={**homes, **extra}, capture_output=True, text=True, timeout=120)

    one_line(run("settings", "keys"), 4, "unexpected error: ZeroDivisionError: division by zero", "--debug",
             "KERUTA_DEBUG=1")
    for result in (run("--debug", "settings", "keys"), run("settings", "keys", "--debug"),
                   run("settings", "keys", KERUTA_DEBUG="1")):
        assert result.returncode == 4
        assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
        assert result.stderr.splitlines()[-1].startswith("keruta-prefect: unexpected error: ZeroDivisionError")


# --- Prefect: the temporary server, the API, stored blocks ------------------------------------------

def test_the_temporary_server_gets_a_generous_startup_time_unless_the_user_set_one(homes: dict[str, str]) -> None:
    """Prefect's default (20 s) is too short for a first start on 2 cores; a user's value (env or profile) wins.
    Likewise the temporary server's telemetry is off (no ERROR about it where there is no internet) unless
    the user turned it on."""
    code = ("import sys, argparse, keruta_prefect.cli as cli\n"
            "with cli._prefect_defaults() as timeout:\n"
            "    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as S\n"
            "    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED as A\n"
            "    print(timeout, S.value(), A.value())\n")

    fresh = {k: v for k, v in homes.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}  # as a user has it

    def value(**extra: str) -> str:
        result = subprocess.run([sys.executable, "-c", code], env={**fresh, **extra}, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert value() == "180 180 False"
    assert value(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="45") == "45 45 False"
    assert value(PREFECT_SERVER_ANALYTICS_ENABLED="true") == "180 180 True"
    profile = subprocess.run([str(EXE.parent / "prefect"), "config", "set",
                              "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=77"],
                             env=homes, capture_output=True, text=True, timeout=120)
    assert profile.returncode == 0, profile.stderr
    assert value() == "77 77 False"


def test_a_temporary_server_that_does_not_start_in_time_is_one_line_saying_what_to_do(
    homes: dict[str, str]
) -> None:
    # 0 s: Prefect gives up at once (deterministic); the user's value is the one named.
    one_line(cli(homes, "blocks", "seed", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0"), 2,
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=0", "set it higher", "prefect server start")


def test_a_prefect_api_that_is_down_is_one_line_naming_the_url(homes: dict[str, str], refused_port: int) -> None:
    url = f"http://127.0.0.1:{refused_port}/api"
    one_line(cli(homes, "blocks", "seed", PREFECT_API_URL=url), 2, f"PREFECT_API_URL='{url}'", "cannot reach")


@pytest.fixture
def prefect_api(prefect_server: None) -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url
    return str(url)


def ui_edit(slug: str, name: str, **changes: object) -> None:
    """Change a block document the way the Prefect UI's form does (PATCH /block_documents/{id}); None deletes."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentUpdate

    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, slug)
        data = {k: v for k, v in {**document.data, **changes}.items() if v is not None}
        client.update_block_document(document.id, BlockDocumentUpdate(data=data, merge_existing_data=False))


def test_doctor_with_a_settings_block_that_does_not_exist_is_one_line(homes: dict[str, str], prefect_api: str) -> None:
    one_line(cli(homes, "doctor", "--settings-block", "no-such-block", PREFECT_API_URL=prefect_api), 2,
             "--settings-block='no-such-block'", "blocks seed --name no-such-block")


def test_a_settings_block_made_invalid_in_the_ui_is_one_line_everywhere(
    homes: dict[str, str], prefect_api: str, task_file: Path
) -> None:
    from keruta_prefect.blocks import load_settings, seed
    from keruta_prefect.flows import keruta_task

    name = f"edited-{uuid.uuid4().hex[:8]}"
    seed(KerutaSettings(), name=name)
    ui_edit("keruta-kubernetes-settings", name, default_namespace="Not A Namespace", api_port="eighty")
    names = [f"keruta-kubernetes-settings/{name}", "default_namespace='Not A Namespace'", "api_port='eighty'"]

    with pytest.raises(SettingsError) as raised:  # what a flow loads
        load_settings(name)
    assert "\n" not in str(raised.value) and all(n in str(raised.value) for n in names)
    state = keruta_task(task_spec={"id": f"t-{name}", "script": "echo hi"}, settings_block=name, return_state=True)
    assert state.is_failed()
    with pytest.raises(SettingsError) as raised:
        state.result()
    assert "\n" not in str(raised.value) and all(n in str(raised.value) for n in names)

    for command in (["doctor", "--settings-block", name], ["run", "--task-file", str(task_file), "--settings-block",
                                                            name], ["dispatch", "--settings-block", name]):
        one_line(cli(homes, *command, PREFECT_API_URL=prefect_api), 2, *names)

    seed(KerutaSettings(), name=name)  # a re-seed never replaces the stored (even invalid) block
    with pytest.raises(SettingsError):
        load_settings(name)


def test_an_api_block_without_a_token_is_one_line(homes: dict[str, str], prefect_api: str) -> None:
    from keruta_prefect.blocks import seed

    name = f"api-{uuid.uuid4().hex[:8]}"
    seed(KerutaSettings(), name=name, token="a-token")
    ui_edit("keruta-api", name, token=None)
    one_line(cli(homes, "api", "--block", name, "--port", str(free_port()), PREFECT_API_URL=prefect_api), 2,
             f"block keruta-api/{name}: token: is required")


# --- seeding is create-if-absent ----------------------------------------------------------------------

def test_two_seeders_racing_never_overwrite_the_first_nor_an_edit_made_in_between(
    prefect_server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both seeders decide before either writes (a barrier at the write); the first writes; the block is
    edited in the UI; then the second writes. Create-if-absent: the second finds the name taken."""
    from keruta_prefect import blocks
    from keruta_prefect.blocks import KerutaApiCredentials, KerutaKubernetesSettings, seed

    blocks.register_block_types()  # the types exist (their own race: the next test); the documents race here
    name = f"race-{uuid.uuid4().hex[:8]}"
    for block_cls in (KerutaKubernetesSettings, KerutaApiCredentials):
        at_write = threading.Barrier(2, timeout=60)
        first_done = threading.Event()
        original = block_cls.save

        def save(self: object, *args: object, _b: threading.Barrier = at_write, _e: threading.Event = first_done,
                 _orig: object = original, _cls: type = block_cls, **kwargs: object) -> object:
            if _b.wait() == 0:  # the first: write, then let the UI edit happen
                try:
                    return _orig(self, *args, **kwargs)  # type: ignore[operator]
                finally:
                    if _cls is KerutaKubernetesSettings:
                        ui_edit("keruta-kubernetes-settings", name, default_namespace="edited-in-ui")
                    _e.set()
            assert _e.wait(60)
            return _orig(self, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(block_cls, "save", save)
    reports: dict[str, blocks.SeedReport] = {}

    def seeder(label: str) -> None:
        reports[label] = seed(KerutaSettings(default_namespace=f"from-{label}"), name=name, token=f"token-{label}")

    threads = [threading.Thread(target=seeder, args=(label,)) for label in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert set(reports) == {"a", "b"}
    assert sorted(r.settings_created for r in reports.values()) == [False, True]
    assert sorted(r.api_created for r in reports.values()) == [False, True]
    monkeypatch.undo()
    assert KerutaKubernetesSettings.load(name).default_namespace == "edited-in-ui"
    api_winner = next(label for label, r in reports.items() if r.api_created)
    assert KerutaApiCredentials.load(name).token.get_secret_value() == f"token-{api_winner}"


def test_block_type_registration_racing_another_process_is_not_an_error(
    prefect_server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect registers a block type by read-then-create: of two first registrations (two first runs on a
    fresh server), both read "absent" and the second create gets a 409. Fresh type names stand for a fresh server."""
    from prefect.client.orchestration import SyncPrefectClient

    from keruta_prefect.blocks import KerutaApiCredentials, KerutaKubernetesSettings, register_block_types

    tag = uuid.uuid4().hex[:8]
    gates: dict[str, tuple[threading.Barrier, threading.Event]] = {}
    for block_cls in (KerutaKubernetesSettings, KerutaApiCredentials):
        slug = f"{block_cls.get_block_type_slug()}-{tag}"
        for attr in ("_block_type_id", "_block_schema_id"):  # restored after the test
            monkeypatch.setattr(block_cls, attr, getattr(block_cls, attr))
        monkeypatch.setattr(block_cls, "_block_type_slug", slug)
        monkeypatch.setattr(block_cls, "_block_type_name", f"{block_cls._block_type_name} {tag}")
        gates[slug] = (threading.Barrier(2, timeout=60), threading.Event())
    original = SyncPrefectClient.create_block_type

    def create_block_type(self: SyncPrefectClient, block_type: Any) -> Any:
        at_create, first_done = gates[block_type.slug]
        if at_create.wait() == 0:  # both registrations read "absent": the first creates
            try:
                return original(self, block_type)
            finally:
                first_done.set()
        assert first_done.wait(60)
        return original(self, block_type)

    monkeypatch.setattr(SyncPrefectClient, "create_block_type", create_block_type)
    errors: list[BaseException] = []

    def register() -> None:
        try:
            register_block_types()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []


# --- the description's truncation marker -------------------------------------------------------------

ALPHABET = ["a", "é", "日", "😀", " ", "\n"]  # 1, 2, 3 and 4 UTF-8 bytes


def test_truncation_keeps_marker_included_within_the_limit_on_a_character_boundary() -> None:
    rng = random.Random(14)
    marker = TRUNCATION_MARKER.replace("{id}", "task-" + "x" * 500)  # a long id: a marker of 540 bytes
    marker_size = len(marker.encode())
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 2000))) for _ in range(40)]
    texts += ["😀" * 700, "a" * 5000]
    for text in texts:
        size = len(text.encode())
        for limit in [*range(0, 80), *rng.sample(range(80, 6000), 60), marker_size - 1, marker_size,
                      marker_size + 1, size - 1, size, size + 1]:
            if limit < 0:
                continue
            for m in (marker, TRUNCATION_MARKER.replace("{id}", "t")):
                out = truncate_utf8(text, limit, m)
                data = out.encode()
                assert len(data) <= limit, (limit, len(data))
                if size <= limit:
                    assert out == text
                    continue
                kept = next(p for p in (m, "…[truncated]", "…", "") if out.endswith(p))
                prefix = out[: len(out) - len(kept)]
                assert text.startswith(prefix)  # whole characters only, in order
                if len(m.encode()) <= limit:
                    assert kept == m
                    # as much text as fits: the next character would not
                    assert len(data) + len(text[len(prefix)].encode()) > limit


def test_the_task_environment_stays_within_the_limit_for_a_long_task_id() -> None:
    task = Task(id="t" * 400, title="title " * 100, description="日本語" * 3000)
    for limit in (64, 100, 300, 4096):
        env = task_env(task, KerutaSettings(description_env_limit=limit))
        for key, text in (("KERUTA_TASK_TITLE", task.title), ("KERUTA_TASK_DESCRIPTION", task.description)):
            assert len(env[key].encode()) <= limit, (key, limit)
            if len(text.encode()) > limit:
                assert env[key].endswith(("]", "…")) and text.startswith(env[key].rstrip("]").rsplit("…", 1)[0])
            else:
                assert env[key] == text
