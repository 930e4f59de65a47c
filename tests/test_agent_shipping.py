"""keruta-agent's log shipping under refusals, its log levels, and its CLI under bad input.

Every test runs the agent as its own process against a real keruta API on loopback. Where an API
must refuse (413 over a body cap, 422 for some lines, 401/403/404 for everything) a small test-only HTTP
front (`Front`) sits between them: it forwards every request to the real API unless told to refuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from keruta_prefect.agent.runner import MAX_LINE_BYTES, Line, batch_length
from keruta_prefect.client import ApiError, ApiRejected, KerutaClient, encode_json
from keruta_prefect.models import Task, TaskStatus
from keruta_prefect.store import Store
from tests.conftest import Api, run_agent
from tests.scripted_http import Answer, Seen, scripted

# (method, path, body) -> None to forward, or (status, detail) to refuse
Refusal = Callable[[str, str, bytes], "tuple[int, str] | None"]


class Front:
    """A test-only HTTP server in front of the real keruta API.

    - ``cap``: bodies over this many bytes get 413 (as a proxy or a stricter API would answer);
    - ``refuse``: decides per request whether to answer with an error instead of forwarding;
    - ``hold_logs``: the first log batch waits until the script calls ``/test/release`` (so every line
      it printed is queued in the agent by then: the agent's next batch has all it can take).
    """

    def __init__(self, upstream: str, *, cap: int | None = None, refuse: Refusal | None = None,
                 hold_logs: bool = False) -> None:
        self.upstream = upstream
        self.cap = cap
        self.refuse = refuse
        self.released = threading.Event()
        if not hold_logs:
            self.released.set()
        self.answers: list[tuple[str, str, int, int]] = []  # (method, path, status, body bytes)
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=upstream, timeout=60)
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, content, ctype = front.answer(self.command, self.path, dict(self.headers), body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except OSError:
                    pass  # the agent gave up on this request (its timeout) and sent it again

            do_GET = do_PUT = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, str]:
        if path == "/test/release":
            self.released.set()
            return self._record(method, path, 200, body, {"released": True})
        if path.endswith("/logs") and method == "POST":
            self.released.wait(60)
        if self.cap is not None and len(body) > self.cap:
            return self._record(method, path, 413, body, {"detail": f"body over the {self.cap}-byte limit"})
        refused = self.refuse(method, path, body) if self.refuse else None
        if refused is not None:
            return self._record(method, path, refused[0], body, {"detail": refused[1]})
        forward = {k: v for k, v in headers.items() if k.lower() in ("authorization", "content-type")}
        response = self._http.request(method, path, headers=forward, content=body)
        with self._lock:
            self.answers.append((method, path, response.status_code, len(body)))
        return response.status_code, response.content, response.headers.get("content-type", "application/json")

    def _record(self, method: str, path: str, status: int, body: bytes, answer: dict[str, object]
                ) -> tuple[int, bytes, str]:
        with self._lock:
            self.answers.append((method, path, status, len(body)))
        return status, json.dumps(answer).encode(), "application/json"

    def count(self, status: int) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a[2] == status)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Front:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self._http.close()


class Via(Api):
    """The real API's token and store, reached through a Front."""

    def __init__(self, api: Api, front: Front) -> None:
        self.__dict__.update(api.__dict__)
        self._front = front

    @property
    def url(self) -> str:
        return self._front.url


def make(store: Store, task_id: str, script: str) -> None:
    store.create_task(Task.model_validate({"id": task_id, "script": script}))


def python_script(body: str) -> str:
    return f"#!{sys.executable}\nimport os, sys, urllib.request\nw = sys.stdout.write\n{body}"


RELEASE = "sys.stdout.flush()\nurllib.request.urlopen(os.environ['KERUTA_API_URL'] + '/test/release').read()\n"


def pieces(line: str) -> list[str]:
    """How the agent stores one ASCII line: in pieces of MAX_LINE_BYTES."""
    return [line[i:i + MAX_LINE_BYTES] for i in range(0, len(line), MAX_LINE_BYTES)] or [""]


def script_rows(store: Store, task_id: str) -> list[tuple[str, str]]:
    return [(r.level, r.message) for r in store.logs(task_id) if r.source.startswith("agent-")]


# --- 2: batches bounded by bytes; refusals split, isolated, or reported once ------------------------------

SIZES = ("for i in range(3000): w(f'tiny {i}\\n')\n"
         "w('\\n')\n"
         "for i in range(1100): w(f'{i:05d}' + 'k' * (MAX - 6) + '\\n')\n"  # 1,100 lines of 16 KiB - 1
         "for n in (MAX, MAX + 1, 3 * MAX, 100000): w('b' * n + '\\n')\n"
         "for i in range(3000): w(f'after {i}\\n')\n")


def expected_sizes() -> list[str]:
    lines = [f"tiny {i}" for i in range(3000)] + [""]
    lines += [f"{i:05d}" + "k" * (MAX_LINE_BYTES - 6) for i in range(1100)]
    lines += ["b" * n for n in (MAX_LINE_BYTES, MAX_LINE_BYTES + 1, 3 * MAX_LINE_BYTES, 100000)]
    lines += [f"after {i}" for i in range(3000)]
    return [piece for line in lines for piece in pieces(line)]


def test_lines_of_every_size_are_stored_once_in_order_by_the_real_api(api: Api, store: Store,
                                                                       tmp_path: Path) -> None:
    # 1,100 lines of 16 KiB are 17 MiB: more than the API takes in one body (16 MiB). The front holds the
    # first batch until the script has printed everything, so they are all queued in the agent at once.
    make(store, "sizes", python_script(f"MAX = {MAX_LINE_BYTES}\n" + SIZES + RELEASE))
    with Front(api.url, hold_logs=True) as front:
        done = run_agent(Via(api, front), "sizes", tmp_path / "w")
    assert done.returncode == 0, done.stderr
    assert [m for _, m in script_rows(store, "sizes")] == expected_sizes()
    assert store.get_task("sizes").status == "COMPLETED"
    assert front.count(413) == 0
    assert max(size for method, path, _, size in front.answers if path.endswith("/logs")) <= 1024 * 1024


def test_an_api_that_refuses_bodies_over_a_small_cap_still_gets_every_line(api: Api, store: Store,
                                                                          tmp_path: Path) -> None:
    make(store, "capped", python_script(f"MAX = {MAX_LINE_BYTES}\n" + SIZES + RELEASE))
    with Front(api.url, cap=100_000, hold_logs=True) as front:
        done = run_agent(Via(api, front), "capped", tmp_path / "w")
    assert done.returncode == 0, done.stderr
    assert [m for _, m in script_rows(store, "capped")] == expected_sizes()
    # The agent splits a refused batch and then keeps its batches under the size that was refused.
    assert 1 <= front.count(413) <= 16, front.count(413)
    assert "refused" not in done.stderr


def refuse_poison(method: str, path: str, body: bytes) -> tuple[int, str] | None:
    if path.endswith("/logs") and b"POISON" in body:
        return 422, "a line of this batch is not acceptable (test rule)"
    return None


def test_lines_the_api_refuses_are_isolated_and_dropped_with_one_report(api: Api, store: Store,
                                                                       tmp_path: Path) -> None:
    body = "for i in range(3000): w(('POISON ' if i in (7, 2500) else 'line ') + str(i) + '\\n')\n"
    make(store, "poison", python_script(body))
    with Front(api.url, refuse=refuse_poison) as front:
        done = run_agent(Via(api, front), "poison", tmp_path / "w")
    assert done.returncode == 0, done.stderr
    assert store.get_task("poison").status == "COMPLETED"
    rows = script_rows(store, "poison")
    reports = [m for level, m in rows if level == "ERROR"]
    assert [m for level, m in rows if level == "INFO"] == [f"line {i}" for i in range(3000) if i not in (7, 2500)]
    # One report per refusal: how many lines, and why; on stderr and in the task's log.
    refused = [line for line in done.stderr.splitlines() if "refused" in line]
    assert 1 <= len(reports) <= 2 and len(refused) == len(reports), (reports, done.stderr)
    assert sum(int(r.split(" refused ")[1].split(" ")[0]) for r in reports) == 2, reports
    assert all("HTTP 422: a line of this batch is not acceptable (test rule)" in r for r in reports)
    assert all(r.split("keruta-agent ERROR ", 1)[1] in reports for r in refused)
    # Isolation is a bisection: far fewer requests than one per line.
    assert front.count(422) <= 40, front.count(422)


@pytest.mark.parametrize(("status", "detail"), [(401, "missing or wrong token (Authorization: Bearer <token>)"),
                                                (403, "forbidden"), (404, "task 'gone' not found"),
                                                (405, "Method Not Allowed"), (407, "Proxy Authentication Required")])
def test_a_permanent_refusal_of_the_logs_is_reported_once_and_is_not_api_unreachable(
        api: Api, store: Store, tmp_path: Path, status: int, detail: str) -> None:
    def refuse_logs(method: str, path: str, body: bytes) -> tuple[int, str] | None:
        return (status, detail) if path.endswith("/logs") else None

    make(store, "gone", "for i in $(seq 1 300); do echo line $i; done")
    with Front(api.url, refuse=refuse_logs) as front:
        done = run_agent(Via(api, front), "gone", tmp_path / "w", "--api-retry-seconds", "60")
    # A configuration error (the Job's podFailurePolicy fails it at once), not 3 (API unreachable: retried).
    assert done.returncode == 2, done.stderr
    assert "unreachable" not in done.stderr and "Traceback" not in done.stderr
    assert sum(f"HTTP {status}" in line for line in done.stderr.splitlines()) == 1, done.stderr
    spool = tmp_path / "w" / ".keruta" / "unsent-logs.jsonl"
    assert [json.loads(line)["message"] for line in spool.read_text().splitlines()] == [
        f"line {i}" for i in range(1, 301)]
    assert str(spool) in done.stderr.splitlines()[-1]
    assert store.get_task("gone").status == "COMPLETED"  # the status calls were accepted
    assert front.count(status) <= 2  # no retry storm


def test_a_blanket_refusal_of_every_line_is_recognised_and_ends_shipping_once(
        api: Api, store: Store, tmp_path: Path) -> None:
    """A proxy that answers 400 to every log post: not "some bad lines" to bisect for ever, line by line."""
    def refuse_logs(method: str, path: str, body: bytes) -> tuple[int, str] | None:
        return (400, "Bad Request") if path.endswith("/logs") else None

    make(store, "blanket", "for i in $(seq 1 3000); do echo line $i; done")
    with Front(api.url, refuse=refuse_logs) as front:
        done = run_agent(Via(api, front), "blanket", tmp_path / "w", "--api-retry-seconds", "60")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "refused, one by one" in done.stderr
    assert front.count(400) <= 200, front.count(400)  # not about two requests for each of 3,000 lines
    spool = tmp_path / "w" / ".keruta" / "unsent-logs.jsonl"
    assert len(spool.read_text().splitlines()) >= 2900  # what was not tried line by line is kept


def test_a_final_status_refused_for_good_is_a_configuration_error(api: Api, store: Store, tmp_path: Path) -> None:
    def refuse_final(method: str, path: str, body: bytes) -> tuple[int, str] | None:
        if path.endswith("/status") and b'"COMPLETED"' in body:
            return 401, "missing or wrong token (Authorization: Bearer <token>)"
        return None

    make(store, "final", "echo hi")
    with Front(api.url, refuse=refuse_final) as front:
        done = run_agent(Via(api, front), "final", tmp_path / "w")
    assert done.returncode == 2, done.stderr
    assert "report COMPLETED for final: HTTP 401" in done.stderr.splitlines()[-1]
    assert store.get_task("final").status == "IN_PROGRESS"


def test_batches_are_bounded_by_the_bytes_of_their_body_and_by_lines() -> None:
    sizes = [0, 1, 100, MAX_LINE_BYTES, 3, MAX_LINE_BYTES * 4, 7, 0] * 300
    lines = [Line.of({"seq": i, "level": "INFO", "message": "\x01" * n, "ts": 1.0}) for i, n in enumerate(sizes)]
    for max_lines, max_bytes in ((2000, 512 * 1024), (5, 10**9), (2000, 50_000)):
        rest = lines
        while rest:
            count = batch_length(rest, max_lines, max_bytes)
            body = encode_json({"source": "agent-0123456789abcdef", "lines": [line.item for line in rest[:count]]})
            assert 1 <= count <= max_lines
            assert len(body) <= max_bytes or count == 1  # a line alone is always sent
            rest = rest[count:]


def test_helper_arguments_that_are_not_utf8_are_sent_not_crashed_on(api: Api, store: Store) -> None:
    make(store, "bytes", "echo x")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")},
           "KERUTA_API_TOKEN": api.token, "KERUTA_TASK_ID": "bytes", "KERUTA_API_URL": api.url}
    store.set_status("bytes", TaskStatus.IN_PROGRESS)
    for args in ([b"log", b"INFO", b"caf\xe9"], [b"progress", b"5", b"--message", b"caf\xe9"]):
        done = subprocess.run([sys.executable.encode(), b"-m", b"keruta_prefect.agent", *args], env=env,
                              capture_output=True, timeout=60)
        assert (done.returncode, done.stderr) == (0, b"")
    assert [r.message for r in store.logs("bytes")] == ["caf\ufffd"]
    assert store.get_task("bytes").message == "caf\ufffd"


def test_a_line_of_exactly_16_kib_is_not_followed_by_an_empty_line(api: Api, store: Store, tmp_path: Path) -> None:
    make(store, "exact", python_script(f"w('x' * {MAX_LINE_BYTES} + '\\n')\nw('next\\n')\n"))
    assert run_agent(api, "exact", tmp_path / "w").returncode == 0
    assert [m for _, m in script_rows(store, "exact")] == ["x" * MAX_LINE_BYTES, "next"]


def test_the_log_helper_sends_a_message_longer_than_the_api_takes_per_line(api: Api, store: Store,
                                                                           tmp_path: Path) -> None:
    # MAX_LOG_MESSAGE is 64 Ki characters; a helper call with 100,000 is sent in pieces, not refused.
    make(store, "helper", 'keruta-agent log INFO "$(head -c 100000 /dev/zero | tr "\\0" m)"\necho done')
    done = run_agent(api, "helper", tmp_path / "w")
    assert done.returncode == 0, done.stderr
    rows = [r for r in store.logs("helper") if not r.source.startswith("agent-")]
    assert "".join(r.message for r in rows) == "m" * 100000
    assert all(len(r.message.encode()) <= MAX_LINE_BYTES for r in rows)


def test_nul_bytes_in_output_are_stored_on_postgresql(postgres: object, keruta_home: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # PostgreSQL text cannot hold NUL: the agent stores it as U+FFFD (as it does invalid UTF-8) instead of
    # sending a batch that fails with 500 on every retry.
    from keruta_prefect.store import get_store

    name = f"keruta_nul_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)  # type: ignore[attr-defined]
    monkeypatch.setenv("KERUTA_DATABASE_URL", postgres.url(name))  # type: ignore[attr-defined]
    store = get_store()
    api = Api(store, keruta_home / "artifacts").start()
    try:
        make(store, "nul", "printf 'a\\000b\\n'\necho after")
        done = run_agent(api, "nul", tmp_path / "w", "--api-retry-seconds", "5")
    finally:
        api.stop()
    assert done.returncode == 0, done.stderr
    assert [m for _, m in script_rows(store, "nul")] == ["a\ufffdb", "after"]


# --- 14e: a script's stderr is INFO; the agent's own lines keep their levels -------------------------------

def test_stdout_and_stderr_are_info_and_the_agent_says_why_the_task_failed(api: Api, store: Store,
                                                                          tmp_path: Path) -> None:
    make(store, "levels", "echo out\necho 'Cloning into repo...' >&2\nexit 3")
    done = run_agent(api, "levels", tmp_path / "w")
    assert done.returncode == 1
    rows = script_rows(store, "levels")
    assert sorted(m for level, m in rows if level == "INFO") == ["Cloning into repo...", "out"]
    assert [m for level, m in rows if level == "ERROR"] == ["script exited with code 3"]
    assert rows[-1] == ("ERROR", "script exited with code 3")


def test_a_successful_script_has_no_error_line(api: Api, store: Store, tmp_path: Path) -> None:
    make(store, "quiet", "echo progress >&2\necho ok")
    assert run_agent(api, "quiet", tmp_path / "w").returncode == 0
    assert {level for level, _ in script_rows(store, "quiet")} == {"INFO"}


# --- 8: never a bare traceback; bad input is one line and exit 2 --------------------------------------------

AGENT = [sys.executable, "-m", "keruta_prefect.agent"]


def agent(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")}
    return subprocess.run([*AGENT, *args], env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[dict[str, str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    yield {"file": str(a_file), "under_file": str(a_file / "sub"), "dir": str(tmp_path / "ok")}


RUN_CASES: list[tuple[str, list[str], dict[str, str], str]] = [
    ("timeout", [], {"KERUTA_TIMEOUT": "abc"}, "KERUTA_TIMEOUT='abc'"),
    ("timeout-nan", [], {"KERUTA_TIMEOUT": "nan"}, "KERUTA_TIMEOUT='nan'"),
    ("timeout-inf", ["--timeout", "inf"], {}, "--timeout='inf'"),
    ("hold", [], {"KERUTA_HOLD_SECONDS": "-1"}, "KERUTA_HOLD_SECONDS='-1'"),
    ("retry", [], {"KERUTA_API_RETRY_SECONDS": "0"}, "KERUTA_API_RETRY_SECONDS='0'"),
    ("grace", ["--grace", "soon"], {}, "--grace='soon'"),
    ("log-level", [], {"KERUTA_LOG_LEVEL": "LOUD"}, "KERUTA_LOG_LEVEL='LOUD'"),
    ("echo", [], {"KERUTA_ECHO": "maybe"}, "KERUTA_ECHO='maybe'"),
    ("mode", [], {"KERUTA_ARTIFACTS_MODE": "uplaod"}, "KERUTA_ARTIFACTS_MODE='uplaod'"),
    ("work-dir-file", ["--work-dir", "{file}"], {}, "--work-dir='{file}'"),
    ("work-dir-under-file", [], {"KERUTA_WORK_DIR": "{under_file}"}, "KERUTA_WORK_DIR='{under_file}'"),
    ("artifacts-dir-file", ["--artifacts-dir", "{file}"], {}, "--artifacts-dir='{file}'"),
    ("no-token", [], {"KERUTA_API_TOKEN": ""}, "KERUTA_API_TOKEN is required"),
    ("token-space", [], {"KERUTA_API_TOKEN": "two words"}, "KERUTA_API_TOKEN"),
    ("url-scheme", ["--api-url", "ftp://keruta"], {}, "--api-url='ftp://keruta'"),
    ("url-garbage", [], {"KERUTA_API_URL": "not a url"}, "KERUTA_API_URL='not a url'"),
    ("task-id", ["--task-id", "../etc"], {}, "--task-id='../etc'"),
    ("unknown-flag", ["--frobnicate"], {}, "--frobnicate"),
]


@pytest.mark.parametrize("command", ["run", "execute"])
@pytest.mark.parametrize(("case", "args", "env", "expected"), RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_with_bad_input_says_one_line_and_exits_2(api: Api, store: Store, paths: dict[str, str], command: str,
                                                      case: str, args: list[str], env: dict[str, str],
                                                      expected: str) -> None:
    make(store, "t", "echo never")
    base = {"KERUTA_API_TOKEN": api.token, "KERUTA_TASK_ID": "t", "KERUTA_API_URL": api.url,
            "KERUTA_WORK_DIR": paths["dir"] + "/w", "KERUTA_ARTIFACTS_DIR": paths["dir"] + "/a"}
    base.update({k: v.format(**paths) for k, v in env.items()})
    done = agent(command, *[a.format(**paths) for a in args], env={k: v for k, v in base.items() if v})
    line = one_line(done)
    assert done.returncode == 2, done.stderr
    assert line.startswith("keruta-agent") and expected.format(**paths) in line, line
    if case == "token-space":
        assert "two words" not in line  # a token is never printed
    assert store.get_task("t").status == "PENDING"  # refused before the task was touched


HELPER_CASES: list[tuple[str, list[str], dict[str, str], str]] = [
    ("log-level", ["log", "LOUD", "hi"], {}, "LEVEL='LOUD'"),
    ("log-no-message", ["log", "INFO"], {}, "message"),
    ("log-no-task", ["log", "INFO", "hi"], {"KERUTA_TASK_ID": ""}, "KERUTA_TASK_ID is required"),
    ("log-url", ["log", "INFO", "hi"], {"KERUTA_API_URL": "keruta:8080"}, "KERUTA_API_URL='keruta:8080'"),
    ("progress-range", ["progress", "150"], {}, "PERCENT='150'"),
    ("progress-word", ["progress", "half"], {}, "PERCENT='half'"),
    ("progress-token", ["progress", "50"], {"KERUTA_API_TOKEN": ""}, "KERUTA_API_TOKEN is required"),
    ("add-missing", ["artifact", "add", "{dir}/nothing"], {}, "PATH='{dir}/nothing'"),
    ("add-dir-is-file", ["artifact", "add", "{file}"], {"KERUTA_ARTIFACTS_DIR": "{file}"},
     "KERUTA_ARTIFACTS_DIR='{file}'"),
    ("add-under-file", ["artifact", "add", "{file}"], {"KERUTA_ARTIFACTS_DIR": "{under_file}"},
     "KERUTA_ARTIFACTS_DIR='{under_file}'"),
    ("add-name", ["artifact", "add", "{file}", "--name", "a/b"], {}, "--name='a/b'"),
    ("list-dir-is-file", ["artifact", "list"], {"KERUTA_ARTIFACTS_DIR": "{file}"}, "KERUTA_ARTIFACTS_DIR='{file}'"),
    ("remove-outside", ["artifact", "remove", "../x"], {}, "PATH='../x'"),
    ("remove-dir-is-file", ["artifact", "remove", "x"], {"KERUTA_ARTIFACTS_DIR": "{file}"},
     "KERUTA_ARTIFACTS_DIR='{file}'"),
    ("artifact-nothing", ["artifact"], {}, "artifact"),
    ("health-url", ["health"], {"KERUTA_API_URL": "http://"}, "KERUTA_API_URL='http://'"),
    ("no-command", [], {}, "command"),
    ("unknown-command", ["fly"], {}, "'fly'"),
    ("debug-value", ["artifact", "list"], {"KERUTA_DEBUG": "loud"}, "KERUTA_DEBUG='loud'"),
]


@pytest.mark.parametrize(("case", "args", "env", "expected"), HELPER_CASES, ids=[c[0] for c in HELPER_CASES])
def test_helpers_with_bad_input_say_one_line_and_exit_2(api: Api, store: Store, paths: dict[str, str], case: str,
                                                        args: list[str], env: dict[str, str], expected: str) -> None:
    make(store, "t", "echo never")
    base = {"KERUTA_API_TOKEN": api.token, "KERUTA_TASK_ID": "t", "KERUTA_API_URL": api.url,
            "KERUTA_ARTIFACTS_DIR": paths["dir"] + "/a"}
    base.update({k: v.format(**paths) for k, v in env.items()})
    done = agent(*[a.format(**paths) for a in args], env={k: v for k, v in base.items() if v})
    line = one_line(done)
    assert done.returncode == 2, done.stderr
    assert line.startswith("keruta-agent") and expected.format(**paths) in line, line


def test_refusals_by_the_api_are_exit_2_and_an_unreachable_api_is_exit_3(api: Api, store: Store,
                                                                          tmp_path: Path) -> None:
    from keruta_harness.processes import free_port

    make(store, "t", "echo never")
    good = {"KERUTA_API_TOKEN": api.token, "KERUTA_TASK_ID": "t", "KERUTA_API_URL": api.url}
    done = agent("log", "INFO", "hi", env={**good, "KERUTA_API_TOKEN": "wrong"})
    assert (done.returncode, "HTTP 401" in one_line(done)) == (2, True)
    done = agent("progress", "5", env={**good, "KERUTA_TASK_ID": "nope"})
    assert (done.returncode, "HTTP 404" in one_line(done)) == (2, True)
    assert agent("health", env=good).stdout == "ok\n"
    # Something answers, but it is not a keruta API: a configuration error, not "unreachable".
    with Front(api.url, refuse=lambda m, p, b: (404, "no such route")) as front:
        done = agent("health", env={**good, "KERUTA_API_URL": front.url})
    line = one_line(done)
    assert done.returncode == 2 and "HTTP 404" in line and front.url in line, line
    nobody = f"http://127.0.0.1:{free_port()}"
    done = agent("health", env={**good, "KERUTA_API_URL": nobody})
    line = one_line(done)
    assert done.returncode == 3 and nobody in line and "not reachable" in line, line


BOOM = ("import sys\nimport keruta_prefect.agent.cli as cli\n"
        "def boom(args):\n    raise RuntimeError('the agent has a bug')\n"
        "cli.cmd_artifact_list = boom\nraise SystemExit(cli.main(sys.argv[1:]))\n")


def test_an_unexpected_error_is_one_line_exit_4_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")}
    base["KERUTA_ARTIFACTS_DIR"] = str(tmp_path)

    def boom(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", BOOM, *args], env={**base, **env}, capture_output=True,
                              text=True, timeout=60)

    done = boom("artifact", "list")
    line = one_line(done)
    assert done.returncode == 4
    assert "RuntimeError: the agent has a bug" in line and "--debug" in line and "KERUTA_DEBUG=1" in line
    for done in (boom("--debug", "artifact", "list"), boom("artifact", "list", "--debug"),
                 boom("artifact", "list", KERUTA_DEBUG="1")):
        assert done.returncode == 4
        assert "Traceback (most recent call last)" in done.stderr and "in boom" in done.stderr, done.stderr
        assert done.stderr.splitlines()[-1].startswith("keruta-agent: internal error: RuntimeError")


def test_a_script_file_name_that_cannot_be_written_fails_the_task_in_one_line(api: Api, store: Store,
                                                                             tmp_path: Path) -> None:
    store.create_task(Task.model_validate({"id": "name", "script": {"content": "echo x", "filename": "sub"}}))
    (tmp_path / "w" / "sub").mkdir(parents=True)  # a directory where the script file would go
    done = run_agent(api, "name", tmp_path / "w")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    task = store.get_task("name")
    assert (task.status, task.error_code) == ("FAILED", "SCRIPT_NOT_RUNNABLE")
    assert "sub" in (task.message or "")


# --- the client: what is refused is never called unreachable -------------------------------------------------

def test_client_an_answer_that_is_not_the_keruta_api_is_a_refusal_not_a_crash() -> None:
    def answer(seen: Seen) -> Answer:
        if seen.path.endswith("/script"):
            return Answer(json={"nothing": 1})
        return Answer(body=b"<html>login</html>", content_type="text/html")

    with scripted(answer) as server, KerutaClient(server.url, "tok", retry_seconds=0) as client:
        with pytest.raises(ApiRejected, match=r"^fetch task t: HTTP 200: .*not a keruta API answer"):
            client.get_task("t")
        with pytest.raises(ApiRejected, match=r"^fetch script of t: HTTP 200: .*not a keruta API answer"):
            client.get_script("t")


def test_client_408_is_retried_and_permanent_refusals_are_named() -> None:
    sleeps: list[float] = []
    with (scripted([Answer(408, body=b""), Answer(json={"id": "t"})]) as server,
          KerutaClient(server.url, "tok", retry_seconds=30, sleep=sleeps.append) as client):
        client.set_status("t", "IN_PROGRESS")
    assert len(server.seen) == 2 and len(sleeps) == 1
    assert [ApiRejected(s, "d", "w").permanent for s in (401, 403, 404, 410, 400, 409, 413, 422)] == [
        True, True, True, True, False, False, False, False]


def test_client_an_unsupported_url_is_refused_at_once() -> None:
    sleeps: list[float] = []
    with (KerutaClient("ftp://keruta", "tok", retry_seconds=30, sleep=sleeps.append) as client,
          pytest.raises(ApiRejected) as refused):
        client.get_task("t")
    assert refused.value.permanent and sleeps == [] and isinstance(refused.value, ApiError)
    assert "ftp://keruta" in str(refused.value)


def test_client_log_batches_are_sent_as_the_bytes_the_agent_measured() -> None:
    lines = [{"seq": 0, "level": "INFO", "message": "café € \u2028 \"q\" \\", "ts": 1.5}]
    with scripted([Answer(json={"success": True})]) as server, KerutaClient(server.url, "tok") as client:
        client.post_logs("t", "agent-x", lines)
    assert [seen.body for seen in server.seen] == [encode_json({"source": "agent-x", "lines": lines})]
    assert server.seen[0].headers["Content-Type"] == "application/json"


def test_an_artifact_that_cannot_be_read_whole_is_named_and_the_others_are_uploaded(tmp_path: Path) -> None:
    """Upload mode: a file that shrank, went or cannot be read while it is sent is one ERROR line naming it;
    the other files are uploaded and the agent goes on to its final report (it never ends without one)."""
    from keruta_prefect.agent.runner import AgentConfig, upload_artifacts
    from keruta_prefect.client import KerutaClient, SourceError

    class Flaky(KerutaClient):
        def __init__(self) -> None:
            super().__init__("http://127.0.0.1:9", "tok", retry_seconds=0)
            self.uploaded: list[str] = []

        def upload_artifact(self, task_id: str, path: Path, relative: str, description: str | None = None) -> None:
            if relative == "shrinks.bin":
                raise SourceError(f"{path} ended after 3 of 10 bytes")
            if relative == "gone.txt":
                raise FileNotFoundError(2, "No such file or directory", str(path))
            self.uploaded.append(relative)

    class Lines:
        def __init__(self) -> None:
            self.lines: list[tuple[str, str]] = []

        def emit(self, level: str, message: str) -> None:
            self.lines.append((level, message))

    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for name in ("a.txt", "gone.txt", "shrinks.bin", "z.txt"):
        (artifacts / name).write_text(name)
    config = AgentConfig(task_id="t", api_url="http://127.0.0.1:9", token="tok", work_dir=tmp_path,
                         artifacts_dir=artifacts, upload=True)
    client, shipper = Flaky(), Lines()
    upload_artifacts(config, client, shipper)  # type: ignore[arg-type]  # only emit() is used
    assert client.uploaded == ["a.txt", "z.txt"]
    assert [level for level, _ in shipper.lines] == ["ERROR", "ERROR"]
    assert "gone.txt not kept" in shipper.lines[0][1] and "shrinks.bin not kept" in shipper.lines[1][1]
