"""keruta-agent as its own process against a real keruta API on loopback."""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keruta_prefect.models import Task
from keruta_prefect.store import Store
from tests.conftest import Api, run_agent
from tests.waiting import Gate, eventually


def make(store: Store, task_id: str, script: str, **extra: object) -> None:
    store.create_task(Task.model_validate({"id": task_id, "script": script, **extra}))


def messages(store: Store, task_id: str) -> list[str]:
    return [row.message for row in store.logs(task_id)]


def test_success_streams_lines_in_order_and_reports_completed(api: Api, store: Store, tmp_path: Path) -> None:
    make(store, "ok", "echo one\necho two >&2\nkeruta-agent log WARN from the helper\n"
                      "keruta-agent progress 60 --message most\necho result > result.txt\n"
                      "keruta-agent artifact add result.txt\necho three")
    done = run_agent(api, "ok", tmp_path / "w")
    assert done.returncode == 0, done.stderr
    task = store.get_task("ok")
    assert (task.status, task.progress, task.error_code) == ("COMPLETED", 60, None)
    rows = store.logs("ok")
    by_source = [r for r in rows if r.source.startswith("agent-")]
    # stdout and stderr both at INFO (stderr carries progress too); their interleaving is best effort.
    assert [r.message for r in by_source if r.message != "two"] == ["one", "three"]
    assert [(r.level, r.message) for r in by_source if r.message == "two"] == [("INFO", "two")]
    assert "ERROR" not in {r.level for r in by_source}
    assert ("WARN", "from the helper") in [(r.level, r.message) for r in rows]
    assert (tmp_path / "w" / "artifacts" / "result.txt").read_text() == "result\n"


def test_non_zero_exit_fails_the_task_and_keeps_the_last_lines(api: Api, store: Store, tmp_path: Path) -> None:
    make(store, "bad", "for i in $(seq 1 50); do echo line $i; done\necho 'about to fail' >&2\nexit 3")
    done = run_agent(api, "bad", tmp_path / "w")
    assert done.returncode == 1
    task = store.get_task("bad")
    assert (task.status, task.error_code, task.message) == ("FAILED", "SCRIPT_EXIT_3", "script exited with code 3")
    rows = store.logs("bad")
    # Each stream keeps its order; stdout and stderr are two pipes, so their interleaving is best effort.
    # Both are INFO; the agent's own ERROR line says why the task failed, after the script's last line.
    assert [r.message for r in rows if r.level == "INFO" and r.message != "about to fail"] == [
        f"line {i}" for i in range(1, 51)]
    assert [r.level for r in rows if r.message == "about to fail"] == ["INFO"]
    assert [(r.level, r.message) for r in rows if r.level == "ERROR"] == [("ERROR", "script exited with code 3")]
    assert rows[-1].message == "script exited with code 3"


def test_timeout_sends_sigterm_then_sigkill(api: Api, store: Store, tmp_path: Path) -> None:
    make(store, "slow", "trap '' TERM\necho started\nsleep 60\necho never")  # ignores SIGTERM
    done = run_agent(api, "slow", tmp_path / "w", "--timeout", "1", "--grace", "1")
    assert done.returncode == 1
    task = store.get_task("slow")
    assert (task.status, task.error_code) == ("FAILED", "TIMEOUT")
    # No "never": the script (deaf to SIGTERM) was killed before its 60 s sleep ended, and run_agent
    # would have given up at 120 s had the agent waited for it.
    assert messages(store, "slow") == ["started", "script timed out after 1s and was stopped"]


def test_non_utf8_and_unterminated_last_line(api: Api, store: Store, tmp_path: Path) -> None:
    make(store, "bytes", "printf 'caf\\351 ok\\n'\nprintf '\\342\\202\\254 euro\\n'\nprintf 'no newline at the end'")
    assert run_agent(api, "bytes", tmp_path / "w").returncode == 0
    assert messages(store, "bytes") == ["caf\ufffd ok", "€ euro", "no newline at the end"]


def test_ten_megabytes_of_output_arrive_complete_and_once(api: Api, store: Store, tmp_path: Path) -> None:
    # 100,000 lines of 100 bytes, and one 200 KB line without a break (sent in 16 KiB pieces).
    script = (f"#!{sys.executable}\nimport sys\nw = sys.stdout.write\n"
              "for i in range(100000):\n    w(f'{i:08d} ' + 'x' * 90 + '\\n')\n"
              "w('y' * 200000 + '\\n')\nw('the end\\n')\n")
    make(store, "big", script)
    start = time.monotonic()
    done = run_agent(api, "big", tmp_path / "w")
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    rows = store.logs("big")
    numbered = [r.message for r in rows if r.message[:8].isdigit()]
    assert len(numbered) == 100000 and numbered[0].startswith("00000000") and numbered[-1].startswith("00099999")
    assert "".join(r.message for r in rows if r.message.startswith("y")) == "y" * 200000
    assert rows[-1].message == "the end"
    assert len({(r.source, r.seq) for r in rows}) == len(rows)
    print(f"10 MB of output stored in {elapsed:.1f}s")


def running(pid: int) -> bool:
    """The process is there and not a zombie (ended, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class Unanswered(socketserver.ThreadingTCPServer):
    """What the agent meets on the API's port while the API is away: each connection is taken and closed
    without an answer (as by a proxy whose upstream is down). Notes each request line, so that the test
    knows the agent tried while the API was away."""

    allow_reuse_address = True  # the port the API has just left
    daemon_threads = True

    class Drop(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            assert isinstance(self.server, Unanswered)
            self.server.requests.append(self.rfile.readline().decode("latin-1").strip())

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), self.Drop)
        self.requests: list[str] = []

    def __enter__(self) -> Unanswered:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.shutdown()
        self.server_close()


def test_api_down_then_back_loses_no_line(store: Store, keruta_home: Path, tmp_path: Path) -> None:
    from keruta_harness.processes import free_port

    api = Api(store, keruta_home / "artifacts", port=free_port()).start()
    gate = Gate(tmp_path / "api-down")
    make(store, "flaky", f"for i in $(seq 1 20); do echo line $i; done\n{gate.wait}\n"
                         "for i in $(seq 21 150); do echo line $i; done")
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    agent = threading.Thread(target=lambda: result.setdefault("done", run_agent(api, "flaky", tmp_path / "w")))
    agent.start()
    with gate:
        eventually(lambda: store.count_logs("flaky") == 20, what="the first 20 lines to be stored")
        api.stop()  # the API goes away mid-run…
        with Unanswered(api.port) as away:
            gate.open()  # …the script prints the other 130 lines and ends…
            eventually(lambda: any(line.endswith("/logs HTTP/1.1") for line in away.requests),
                       what="the agent to try to send lines while the API is away")
        api.start()  # …and the API comes back on the same port
    agent.join(60)
    api.stop()
    assert result["done"].returncode == 0, result["done"].stderr
    assert messages(store, "flaky") == [f"line {i}" for i in range(1, 151)]
    assert store.get_task("flaky").status == "COMPLETED"


def test_api_gone_for_good_spools_unsent_lines_and_exits_3(store: Store, keruta_home: Path, tmp_path: Path) -> None:
    from keruta_harness.processes import free_port

    api = Api(store, keruta_home / "artifacts", port=free_port()).start()
    gate = Gate(tmp_path / "api-gone")
    make(store, "gone", f"echo first\n{gate.wait}\nfor i in $(seq 1 20); do echo later $i; done")
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    agent = threading.Thread(target=lambda: result.setdefault(
        "done", run_agent(api, "gone", tmp_path / "w", "--api-retry-seconds", "2")))
    agent.start()
    with gate:
        eventually(lambda: store.count_logs("gone") == 1, what="the first line to be stored")
        api.stop()
        gate.open()  # the other 20 lines come after the API has gone
    agent.join(60)
    assert result["done"].returncode == 3
    assert "keruta API at" in result["done"].stderr and "unreachable" in result["done"].stderr
    spooled = [json.loads(line)["message"] for line in
               (tmp_path / "w" / ".keruta" / "unsent-logs.jsonl").read_text().splitlines()]
    assert messages(store, "gone") + spooled == ["first"] + [f"later {i}" for i in range(1, 21)]


@pytest.mark.parametrize(
    ("setup", "env", "stderr"),
    [
        ("unknown", {}, "report IN_PROGRESS for unknown: HTTP 404: task 'unknown' not found"),
        ("known", {"KERUTA_API_TOKEN": "wrong"}, "HTTP 401: missing or wrong token"),
    ],
)
def test_configuration_errors_exit_2_with_one_line(api: Api, store: Store, tmp_path: Path, setup: str,
                                                   env: dict[str, str], stderr: str) -> None:
    make(store, "known", "echo x")
    done = run_agent(api, "unknown" if setup == "unknown" else "known", tmp_path / "w", env=env)
    assert done.returncode == 2
    assert stderr in done.stderr and "Traceback" not in done.stderr
    assert store.get_task("known").status == "PENDING"


def test_missing_token_or_task_id_is_a_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")}
    done = subprocess.run([sys.executable, "-m", "keruta_prefect.agent", "run", "--api-url", "http://127.0.0.1:1"],
                          env=env, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, "keruta-agent: --task-id or KERUTA_TASK_ID is required\n")
    done = subprocess.run([sys.executable, "-m", "keruta_prefect.agent", "progress", "150"],
                          env=env, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, "keruta-agent: PERCENT='150': expected a whole number from 0 to 100\n")


def test_a_background_child_holding_the_pipes_does_not_hang_the_agent(api: Api, store: Store, tmp_path: Path) -> None:
    child = tmp_path / "child.pid"
    make(store, "bg", f'sleep 300 &\necho $! > "{child}"\necho parent done')
    done = run_agent(api, "bg", tmp_path / "w")  # (run_agent gives up at 120 s, long before the child ends)
    assert done.returncode == 0
    assert messages(store, "bg") == ["parent done"]
    assert not running(int(child.read_text())), "the agent returned, but not by ending the child holding its pipes"


def test_script_parameters_and_task_env_reach_the_script(api: Api, store: Store, tmp_path: Path) -> None:
    content = 'echo "$KERUTA_PARAM_NAME in $(basename "$PWD") for $KERUTA_TASK_ID"'
    script = {"content": content, "parameters": {"name": "v"}}
    store.create_task(Task.model_validate({"id": "params", "script": script}))
    assert run_agent(api, "params", tmp_path / "w").returncode == 0
    assert messages(store, "params") == ["v in w for params"]


HEAVY = ("prefect", "pydantic", "httpx", "rich", "click", "sqlmodel", "sqlalchemy", "kubernetes", "fastapi", "yaml")
LOADED = ("import sys\nfrom keruta_prefect.agent.cli import main\n"
          "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
          f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\nraise SystemExit(code)\n")


def test_an_agent_run_loads_no_third_party_http_stack_pydantic_nor_prefect(api: Api, store: Store,
                                                                         tmp_path: Path) -> None:
    """What every task's agent process pays for: the whole run of a task, and a helper call, in a fresh
    interpreter (issue 17 ships the agent as a small self-contained executable)."""
    make(store, "lean", "true")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")}
    env.update({"KERUTA_API_TOKEN": api.token, "KERUTA_API_URL": api.url, "KERUTA_TASK_ID": "lean"})
    for args in (["run", "--work-dir", str(tmp_path / "w"), "--artifacts-dir", str(tmp_path / "a")],
                 ["log", "INFO", "hi"], ["--help"]):
        done = subprocess.run([sys.executable, "-c", LOADED, *args], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.stdout.splitlines()[-1:] == ["[]"] and done.returncode == 0, (args, done.stdout, done.stderr)
    assert store.get_task("lean").status == "COMPLETED"
