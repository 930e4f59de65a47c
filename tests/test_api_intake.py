"""The keruta API's intake, over real HTTP: no body byte is read before the token is checked; bodies are
capped while they stream (chunked or not); uploads stream to their destination (no temp file, never whole
in memory) and leave nothing behind when refused; no blocking call holds up the event loop."""

from __future__ import annotations

import hashlib
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from keruta_prefect.api import MAX_BODY, ApiServer, create_app
from keruta_prefect.models import Task
from keruta_prefect.store import Store

TOKEN = "intake-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BLOCK = b"x" * 65536
MiB = 2**20


class Counting:
    """ASGI wrapper: how many body bytes the app pulled from the server (what it read, not what was sent)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.received = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


class Body:
    """A lazily generated request body that counts what the client managed to send."""

    def __init__(self, parts: Iterable[bytes]) -> None:
        self.parts = parts
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for part in self.parts:
            self.sent += len(part)
            yield part


def zeros(total: int) -> Iterator[bytes]:
    for _ in range(total // len(BLOCK)):
        yield BLOCK
    if total % len(BLOCK):
        yield BLOCK[: total % len(BLOCK)]


BOUNDARY = "intake-boundary-7f3a"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def form(*parts: tuple[str, str | None, Iterable[bytes]], close: bool = True) -> Iterator[bytes]:
    """A multipart/form-data body as a stream: (field name, file name or None, content chunks)."""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        yield f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        yield from content
        yield b"\r\n"
    if close:
        yield f"--{BOUNDARY}--\r\n".encode()


@contextmanager
def served(store: Store, root: Path, **caps: int) -> Iterator[tuple[str, Counting]]:
    counting = Counting(create_app(store, TOKEN, artifacts_root=root, **caps))
    server = ApiServer(counting).start()
    try:
        yield server.url, counting
    finally:
        server.stop()


def proc_value(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(key)


class Meter:
    """This process's file writes (/proc/self/io wchar: socket sends are not counted) and its peak RSS
    (VmHWM, reset through /proc/self/clear_refs) from now on."""

    def __init__(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        self.rss = proc_value("/proc/self/status", "VmRSS:") * 1024
        self.wchar = proc_value("/proc/self/io", "wchar:")

    @property
    def written(self) -> int:
        return proc_value("/proc/self/io", "wchar:") - self.wchar

    @property
    def rss_growth(self) -> int:
        return proc_value("/proc/self/status", "VmHWM:") * 1024 - self.rss


@pytest.fixture
def tmpdir_watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Temporary files of this process (tempfile, TMPDIR) go to a directory the test can look into."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# --- 10: no body is read before the token is checked -------------------------------------------------
@pytest.mark.parametrize("header", [None, "Bearer wrong-token"])
@pytest.mark.parametrize(("method", "path", "content_type"), [
    ("POST", "/api/v1/tasks/up/artifacts", MULTIPART["Content-Type"]),
    ("POST", "/api/v1/tasks", "application/json"),
    ("POST", "/api/v1/tasks/up/logs", "application/json"),
    ("PUT", "/api/v1/tasks/up/status", "application/json"),
    ("POST", "/api/v1/no-such-route", "application/json"),
])
def test_an_unauthenticated_300_mb_chunked_body_is_refused_unread(
        store: Store, keruta_home: Path, tmpdir_watched: Path, header: str | None, method: str, path: str,
        content_type: str) -> None:
    store.create_task(Task(id="up"))
    root = keruta_home / "artifacts"
    body = Body(form(("file", "big.bin", zeros(300 * MiB))) if "artifacts" in path else zeros(300 * MiB))
    headers = {"Content-Type": content_type, **({"Authorization": header} if header else {})}
    with served(store, root) as (url, counting):
        meter = Meter()
        response = httpx.request(method, url + path, content=body, headers=headers, timeout=60)
        written, growth = meter.written, meter.rss_growth
    assert counting.received == 0, counting.received  # not one body byte reached the app
    assert written < MiB and growth < 32 * MiB, (written, growth)  # nothing spooled, nothing held
    assert body.sent < 32 * MiB, body.sent  # the client was stopped early (socket buffers aside)
    assert response.status_code == 401 and "token" in response.json()["detail"]
    assert response.headers["connection"] == "close"  # the rest of the body is not drained either
    assert files_under(root) == [] and list(tmpdir_watched.iterdir()) == []
    assert store.artifacts("up") == [] and store.count_logs("up") == 0 and store.get_task("up").status == "PENDING"


def test_the_health_check_and_the_docs_stay_open_and_document_the_upload(store: Store, keruta_home: Path) -> None:
    with served(store, keruta_home / "artifacts") as (url, _):
        assert httpx.get(url + "/api/v1/health").json() == {"status": "ok"}
        assert httpx.get(url + "/api/docs").status_code == 200
        spec = httpx.get(url + "/api/openapi.json").json()
        assert httpx.post(url + "/api/v1/health").status_code == 401  # only reading them is open
    upload = spec["paths"]["/api/v1/tasks/{task_id}/artifacts"]["post"]["requestBody"]["content"]
    assert upload["multipart/form-data"]["schema"]["required"] == ["file"]


# --- 10: size limits hold while the body streams -----------------------------------------------------
@pytest.mark.parametrize(("method", "path", "opening"), [
    ("POST", "/api/v1/tasks", b'{"id": "big", "description": "'),
    ("POST", "/api/v1/tasks/up/logs", b'{"level": "INFO", "message": "'),
    ("PUT", "/api/v1/tasks/up/status", b'{"status": "IN_PROGRESS", "message": "'),
])
def test_a_chunked_json_body_over_the_limit_is_413_after_reading_at_most_the_limit(
        store: Store, keruta_home: Path, method: str, path: str, opening: bytes) -> None:
    store.create_task(Task(id="up"))
    body = Body([opening, *zeros(MAX_BODY + 8 * MiB), b'"}'])  # well-formed JSON, 24 MiB, no Content-Length
    with served(store, keruta_home / "artifacts") as (url, counting):
        response = httpx.request(method, url + path, content=body,
                                 headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413, response.text[:200]
    assert f"over the {MAX_BODY}-byte limit" in response.json()["detail"]
    assert MAX_BODY < counting.received <= MAX_BODY + MiB, counting.received
    assert [t.id for t in store.list_tasks()] == ["up"] and store.count_logs("up") == 0
    assert store.get_task("up").status == "PENDING"


def test_a_declared_content_length_over_the_limit_is_413_before_reading(store: Store, keruta_home: Path) -> None:
    with served(store, keruta_home / "artifacts") as (url, counting):
        response = httpx.post(url + "/api/v1/tasks", content=b"x" * (MAX_BODY + 1), headers=AUTH, timeout=60)
    assert response.status_code == 413 and f"{MAX_BODY + 1} bytes" in response.json()["detail"]
    assert counting.received == 0


@pytest.mark.parametrize("path_first", [True, False])
def test_a_chunked_upload_over_the_file_cap_is_413_after_the_cap_and_leaves_nothing(
        store: Store, keruta_home: Path, tmpdir_watched: Path, path_first: bool) -> None:
    store.create_task(Task(id="up"))
    root = keruta_home / "artifacts"
    cap = 2 * MiB
    path = ("path", None, [b"out/big.bin"])
    file = ("file", "big.bin", zeros(50 * MiB))
    body = Body(form(path, file) if path_first else form(file, path))
    with served(store, root, max_file_size=cap, max_total_size=4 * cap) as (url, counting):
        response = httpx.post(url + "/api/v1/tasks/up/artifacts", content=body, headers={**AUTH, **MULTIPART},
                              timeout=60)
    assert response.status_code == 413
    assert f"is over the {cap}-byte file cap" in response.json()["detail"]
    assert counting.received <= cap + 256 * 1024, counting.received
    assert files_under(root) == [] and list(tmpdir_watched.iterdir()) == []  # no partial file either
    assert store.artifacts("up") == []


def test_an_upload_past_the_total_cap_is_413_after_the_cap_and_keeps_the_earlier_files(
        store: Store, keruta_home: Path) -> None:
    store.create_task(Task(id="up"))
    root = keruta_home / "artifacts"
    with served(store, root, max_file_size=4 * MiB, max_total_size=5 * MiB) as (url, counting):
        first = httpx.post(url + "/api/v1/tasks/up/artifacts", files={"file": ("a.bin", b"a" * (3 * MiB))},
                           headers=AUTH)
        assert first.status_code == 200
        before = counting.received
        body = Body(form(("file", "b.bin", zeros(4 * MiB))))
        second = httpx.post(url + "/api/v1/tasks/up/artifacts", content=body, headers={**AUTH, **MULTIPART})
    assert second.status_code == 413 and "'up' are over the 5242880-byte total cap" in second.json()["detail"]
    assert counting.received - before <= 2 * MiB + 256 * 1024
    assert [p.name for p in files_under(root)] == ["a.bin"]
    assert [a.path for a in store.artifacts("up")] == ["a.bin"]


def test_two_concurrent_uploads_cannot_both_pass_the_total_cap(store: Store, keruta_home: Path) -> None:
    store.create_task(Task(id="up"))
    root = keruta_home / "artifacts"
    both_sending = threading.Barrier(2, timeout=30)

    def overlapping(name: str) -> Iterator[bytes]:
        chunks = form(("file", name, zeros(3 * MiB)))
        yield next(chunks)
        both_sending.wait()  # both requests are under way before either file is sent
        yield from chunks

    responses: dict[str, httpx.Response] = {}
    with served(store, root, max_file_size=4 * MiB, max_total_size=5 * MiB) as (url, _):
        def upload(name: str) -> None:
            responses[name] = httpx.post(url + "/api/v1/tasks/up/artifacts", content=overlapping(name),
                                         headers={**AUTH, **MULTIPART}, timeout=60)

        threads = [threading.Thread(target=upload, args=(name,)) for name in ("a.bin", "b.bin")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(r.status_code for r in responses.values()) == [200, 413]
    assert sum(a.size for a in store.artifacts("up")) == 3 * MiB and len(files_under(root)) == 1


def test_an_upload_streams_to_its_destination_once_never_spooled_nor_whole_in_memory(
        store: Store, keruta_home: Path, tmpdir_watched: Path) -> None:
    store.create_task(Task(id="up"))
    root = keruta_home / "artifacts"
    size = 64 * MiB
    digest = hashlib.sha256()
    for chunk in zeros(size):
        digest.update(chunk)
    # The file part first and `path` after it: the destination is known only at the end.
    body = Body(form(("file", "big.bin", zeros(size)), ("description", None, [b"the big one"]),
                     ("path", None, [b"out/data/big.bin"])))
    with served(store, root, max_file_size=size, max_total_size=2 * size) as (url, _):
        meter = Meter()
        response = httpx.post(url + "/api/v1/tasks/up/artifacts", content=body, headers={**AUTH, **MULTIPART},
                              timeout=120)
        written, growth = meter.written, meter.rss_growth
    assert response.status_code == 200, response.text
    assert "connection" not in response.headers  # read to its end: the connection stays open for the next
    assert response.json() == {"success": True, "path": "out/data/big.bin", "size": size,
                               "sha256": digest.hexdigest()}
    target = root / "up" / "uploads" / "out" / "data" / "big.bin"
    assert files_under(root) == [target] and target.stat().st_size == size
    assert size <= written < size + 4 * MiB, written  # written once (a spooled copy would double it)
    assert growth < 32 * MiB, growth  # never whole in memory
    assert list(tmpdir_watched.iterdir()) == []
    [row] = store.artifacts("up")
    assert (row.path, row.size, row.sha256) == ("out/data/big.bin", size, digest.hexdigest())


@pytest.mark.parametrize(("headers", "parts", "status", "fragment"), [
    ({}, None, 404, "task 'ghost' not found"),
    (MULTIPART, [("path", None, [b"../../etc/passwd"]), ("file", "x", zeros(20 * MiB))], 422, "without '..'"),
    (MULTIPART, [("description", None, [b"no file"])], 422, "file: is required"),
    ({"Content-Type": "application/octet-stream"}, [("file", "x", [b"x"])], 422, "expected multipart/form-data"),
    (MULTIPART, [("file", "a", [b"a"]), ("file", "b", [b"b"])], 422, "only one file"),
    (MULTIPART, [("description", None, zeros(MiB))], 413, "description: over the 65536-byte limit"),
])
def test_bad_uploads_are_refused_in_one_line_early_and_leave_nothing(
        store: Store, keruta_home: Path, headers: dict[str, str], parts: list[Any] | None, status: int,
        fragment: str) -> None:
    store.create_task(Task(id="up"))
    root = keruta_home / "artifacts"
    task = "ghost" if status == 404 else "up"
    body = Body(form(*parts) if parts else form(("file", "x", zeros(20 * MiB))))
    with served(store, root) as (url, counting):
        response = httpx.post(f"{url}/api/v1/tasks/{task}/artifacts", content=body,
                              headers={**AUTH, **(headers or MULTIPART)}, timeout=60)
    assert response.status_code == status and fragment in response.json()["detail"], response.text
    assert "\n" not in response.json()["detail"]
    assert counting.received <= 2 * MiB  # refused before the 20 MiB file was read
    assert files_under(root) == [] and store.artifacts("up") == []


def test_an_upload_cut_short_is_400_and_leaves_no_partial_file(store: Store, keruta_home: Path) -> None:
    store.create_task(Task(id="up"))
    root = keruta_home / "artifacts"
    body = form(("file", "cut.bin", zeros(3 * MiB)), close=False)  # the body ends without a closing boundary
    with served(store, root) as (url, _):
        response = httpx.post(url + "/api/v1/tasks/up/artifacts", content=body, headers={**AUTH, **MULTIPART})
    assert response.status_code == 400 and "closing boundary" in response.json()["detail"]
    assert files_under(root) == [] and store.artifacts("up") == []


def test_an_upload_onto_an_existing_directory_is_409_naming_the_path(store: Store, keruta_home: Path) -> None:
    store.create_task(Task(id="up"))
    root = keruta_home / "artifacts"
    with served(store, root) as (url, _):
        first = httpx.post(url + "/api/v1/tasks/up/artifacts", files={"file": ("f", b"1")},
                           data={"path": "out/f"}, headers=AUTH)
        clash = httpx.post(url + "/api/v1/tasks/up/artifacts", files={"file": ("f", b"2")},
                           data={"path": "out"}, headers=AUTH)
    assert first.status_code == 200
    assert clash.status_code == 409 and clash.json()["detail"].startswith("path='out': cannot be stored there")
    assert [p.name for p in files_under(root)] == ["f"] and len(store.artifacts("up")) == 1


# --- 14a: no blocking call on the event loop ---------------------------------------------------------
class GatedStore(Store):
    """A store whose method ``gate`` blocks (in whatever thread calls it) until the test releases it."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = ""
        self.entered = threading.Event()
        self.release = threading.Event()

    def _pass(self, name: str) -> None:
        if name == self.gate:
            self.entered.set()
            assert self.release.wait(60), "never released"

    def create_task(self, *args: Any, **kwargs: Any) -> Any:
        self._pass("create_task")
        return super().create_task(*args, **kwargs)

    def store_logs(self, *args: Any, **kwargs: Any) -> Any:
        self._pass("store_logs")
        return super().store_logs(*args, **kwargs)

    def add_artifacts(self, *args: Any, **kwargs: Any) -> Any:
        self._pass("add_artifacts")
        return super().add_artifacts(*args, **kwargs)

    def artifacts(self, *args: Any, **kwargs: Any) -> Any:
        self._pass("artifacts")
        return super().artifacts(*args, **kwargs)

    def set_status(self, *args: Any, **kwargs: Any) -> Any:
        self._pass("set_status")
        return super().set_status(*args, **kwargs)


@pytest.mark.parametrize(("gate", "method", "path", "kwargs"), [
    ("store_logs", "POST", "/api/v1/tasks/busy/logs", {"json": {"level": "INFO", "message": "x"}}),
    ("create_task", "POST", "/api/v1/tasks", {"json": {"id": "new"}}),
    ("add_artifacts", "POST", "/api/v1/tasks/busy/artifacts", {"files": {"file": ("f.txt", b"data")}}),
    ("artifacts", "POST", "/api/v1/tasks/busy/artifacts", {"files": {"file": ("f.txt", b"data")}}),
    ("set_status", "PUT", "/api/v1/tasks/busy/status", {"json": {"status": "IN_PROGRESS"}}),
])
def test_a_blocked_database_call_does_not_stop_other_requests(
        keruta_home: Path, monkeypatch: pytest.MonkeyPatch, gate: str, method: str, path: str,
        kwargs: dict[str, Any]) -> None:
    store = GatedStore(f"sqlite:///{keruta_home / 'keruta.db'}")
    store.create_task(Task(id="busy"))
    store.create_task(Task(id="other"))
    store.gate = gate
    outcome: dict[str, Any] = {}
    with served(store, keruta_home / "artifacts") as (url, _):
        def blocked_call() -> None:
            outcome["response"] = httpx.request(method, url + path, headers=AUTH, timeout=90, **kwargs)

        caller = threading.Thread(target=blocked_call)
        caller.start()
        try:
            assert store.entered.wait(30), "the gated call was never made"
            # The event loop is free: the health check and another task's GET answer meanwhile.
            with httpx.Client(base_url=url, headers=AUTH, timeout=10) as other:
                assert other.get("/api/v1/health").json() == {"status": "ok"}
                assert other.get("/api/v1/tasks/other").json()["id"] == "other"
                assert not outcome  # still blocked
        finally:
            store.release.set()
            caller.join(60)
    assert outcome["response"].status_code in (200, 201), outcome["response"].text


def test_nul_in_log_lines_and_status_messages_is_kept_as_a_replacement_character_on_both_databases(
        any_store: Store, tmp_path: Path) -> None:
    """PostgreSQL refuses NUL in text: without this, every retry of the batch got a 500 (read as an outage)."""
    from keruta_prefect.models import Task
    from tests.conftest import Api

    any_store.create_task(Task.model_validate({"id": "nul", "script": "true"}))
    server = Api(any_store, tmp_path / "artifacts").start()
    try:
        logs = httpx.post(f"{server.url}/api/v1/tasks/nul/logs", headers=server.headers,
                          json={"source": "s", "lines": [{"seq": 0, "message": "a\x00b"}]})
        status = httpx.put(f"{server.url}/api/v1/tasks/nul/status", headers=server.headers,
                           json={"status": "IN_PROGRESS", "message": "x\x00y"})
    finally:
        server.stop()
    assert (logs.status_code, status.status_code) == (200, 200)
    assert [row.message for row in any_store.logs("nul")] == ["a\ufffdb"]
    assert any_store.get_task("nul").message == "x\ufffdy"


@pytest.mark.parametrize("field", ["repositoryRef", "session", "storageClass", "title", "documents"])
def test_nul_in_any_task_field_is_refused_naming_it_on_both_databases(any_store: Store, tmp_path: Path,
                                                                       field: str) -> None:
    from tests.conftest import Api

    server = Api(any_store, tmp_path / "artifacts").start()
    value: object = ["a\x00b"] if field == "documents" else "a\x00b"
    try:
        answer = httpx.post(f"{server.url}/api/v1/tasks", headers=server.headers,
                            json={"id": "nul-task", "script": "true", field: value})
    finally:
        server.stop()
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["detail"] and "NUL" in answer.json()["detail"]
    assert any_store.list_tasks() == []


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/api/v1/tasks/t/logs", {"source": "s", "lines": [{"seq": 2**63, "message": "x"}]}),
    ("POST", "/api/v1/tasks/t/logs", {"source": "s", "lines": [{"seq": 1, "ts": 1e20, "message": "x"}]}),
    ("POST", "/api/v1/tasks/t/logs", {"source": "s", "lines": [{"seq": 1, "ts": -1e12, "message": "x"}]}),
    ("POST", "/api/v1/tasks", {"id": "big", "priority": 2**70}),
    ("POST", "/api/v1/tasks", {"id": "big", "priority": 2**31}),
    ("POST", "/api/v1/tasks", {"id": "big", "timeoutSeconds": 10**23}),
    ("GET", "/api/v1/tasks?offset=1180591620717411303424", None),
])
def test_numbers_out_of_range_are_422_not_500(any_store: Store, tmp_path: Path, method: str, path: str,
                                              body: object) -> None:
    from tests.conftest import Api

    any_store.create_task(Task.model_validate({"id": "t", "script": "true"}))
    server = Api(any_store, tmp_path / "artifacts").start()
    try:
        answer = httpx.request(method, f"{server.url}{path}", headers=server.headers, json=body)
        raw_nan = httpx.post(f"{server.url}/api/v1/tasks/t/logs", headers={**server.headers,
                             "Content-Type": "application/json"},
                             content=b'{"source": "s", "lines": [{"seq": 1, "ts": NaN, "message": "x"}]}')
    finally:
        server.stop()
    assert answer.status_code == 422, answer.text
    assert raw_nan.status_code == 422, raw_nan.text
    assert any_store.count_logs("t") == 0


@pytest.mark.parametrize(("method", "path"), [("POST", "/api/v1/tasks/t/logs"), ("POST", "/api/v1/tasks"),
                                              ("PUT", "/api/v1/tasks/t/status")])
def test_json_nested_too_deeply_is_400_not_500(api: Any, store: Store, method: str, path: str) -> None:
    store.create_task(Task.model_validate({"id": "t", "script": "true"}))
    answer = httpx.request(method, f"{api.url}{path}", content=b"[" * 100_000 + b"]" * 100_000,
                           headers={**api.headers, "Content-Type": "application/json"})
    assert answer.status_code in (400, 422), answer.text
    assert "Traceback" not in answer.text
