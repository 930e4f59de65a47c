"""The client of an external keruta API: retries, backoff and what is never retried, against a real HTTP
server on loopback (tests/scripted_http.py) that answers what each test scripts."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from keruta_prefect.client import ApiError, ApiRejected, KerutaClient
from tests.scripted_http import DROP, Answer, Seen, scripted


def client(url: str, retry_seconds: float = 30) -> tuple[KerutaClient, list[float]]:
    sleeps: list[float] = []
    return KerutaClient(url, "tok", retry_seconds=retry_seconds, sleep=sleeps.append), sleeps


def test_5xx_and_connection_errors_are_retried_with_growing_backoff() -> None:
    answers = [DROP, Answer(503, json={"detail": "busy"}), Answer(500, body=b""),
               Answer(json={"id": "t", "status": "IN_PROGRESS"})]
    with scripted(answers) as server:
        api, sleeps = client(server.url)
        with api:
            assert api.set_status("t", "IN_PROGRESS")["status"] == "IN_PROGRESS"
    assert [(s.method, s.path) for s in server.seen] == [("PUT", "/api/v1/tasks/t/status")] * 4
    assert server.seen[0].headers["Authorization"] == "Bearer tok"
    assert len(sleeps) == 3 and sleeps[2] > sleeps[0]  # exponential, jittered


def test_4xx_is_not_retried_and_names_the_call() -> None:
    with scripted([Answer(404, json={"detail": "task 't' not found"})]) as server:
        api, sleeps = client(server.url)
        with api, pytest.raises(ApiRejected, match=r"^fetch task t: HTTP 404: task 't' not found$"):
            api.get_task("t")
    assert len(server.seen) == 1 and sleeps == []


def test_gives_up_after_the_retry_budget_with_the_last_error() -> None:
    with scripted(lambda _seen: Answer(503, json={"detail": "down"})) as server:
        api, _ = client(server.url, retry_seconds=0)
        with api, pytest.raises(ApiError, match=r"unreachable for 0s \(HTTP 503: down\)"):
            api.post_logs("t", "src", [{"seq": 0, "message": "x"}])


def test_an_unreachable_api_is_an_api_error_not_a_refusal() -> None:
    from keruta_harness.processes import free_port

    api, _ = client(f"http://127.0.0.1:{free_port()}", retry_seconds=0)
    with api, pytest.raises(ApiError, match=r"unreachable for 0s \(ConnectionRefusedError") as failed:
        api.get_task("t")
    assert not isinstance(failed.value, ApiRejected)


def test_an_artifact_upload_sends_the_whole_file_again_on_retry(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"0123456789" * 10000)
    with scripted([Answer(502, json={"detail": "bad gateway"}), Answer(json={"success": True})]) as server:
        api, _ = client(server.url)
        with api:
            api.upload_artifact("t", path, "sub/out.bin", description="the output")
    bodies = [seen.body for seen in server.seen]
    assert len(bodies) == 2  # each attempt carries the whole file (the multipart boundary differs)
    assert all(b"0123456789" * 10000 in body for body in bodies)
    assert bodies[0] != bodies[1]


def test_an_artifact_upload_is_the_multipart_form_the_api_reads(api: object, store: object, tmp_path: Path) -> None:
    """The real contract: the embedded API stores the file under its path, whole, with its description."""
    from keruta_prefect.models import Task
    from tests.conftest import Api

    assert isinstance(api, Api)
    api.store.create_task(Task.model_validate({"id": "up", "script": "true"}))
    path = tmp_path / 'we"ird\\na\tme.bin'
    data = os.urandom(300_000)
    path.write_bytes(data)
    with KerutaClient(api.url, api.token, retry_seconds=5) as keruta:
        keruta.upload_artifact("up", path, "sub/vu.bin", description="ünïcode \"q\"\r\n")
    stored = [p for p in api.artifacts_root.rglob("*") if p.is_file() and p.read_bytes() == data]
    assert [p.as_posix().endswith("sub/vu.bin") for p in stored] == [True], list(api.artifacts_root.rglob("*"))


def test_requests_keep_one_connection_and_a_connection_the_server_closed_is_reopened_without_a_pause() -> None:
    def answer(seen: Seen) -> Answer:
        if seen.path.endswith("/close"):
            return DROP  # the server ends the connection (as an idle keep-alive timeout does)
        return Answer(json={"id": "t", "status": "IN_PROGRESS", "script": {"content": "true"}})

    with scripted(answer) as server:
        api, sleeps = client(server.url + "/prefix/")
        with api:
            api.get_task("t")
            api.get_script("t")
            assert server.connections == 1  # keep-alive
            with pytest.raises(ApiError):  # what ended mid-request is retried, then given up
                api.request("GET", "/close", what="close", retry_seconds=0)
            api.get_task("t")
    assert [s.path for s in server.seen] == ["/prefix/api/v1/tasks/t", "/prefix/api/v1/tasks/t/script",
                                             "/prefix/close", "/prefix/api/v1/tasks/t"]
    assert server.connections == 2 and sleeps == []


def test_a_proxy_named_in_the_environment_is_used_and_no_proxy_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    with scripted(lambda _seen: Answer(json={"id": "t"})) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http://", "http://user:pa%20ss@"))
        with KerutaClient("http://keruta-api.example:8080", "tok", retry_seconds=0) as api:
            api.get_task("t")
        assert proxy.seen[0].path == "http://keruta-api.example:8080/api/v1/tasks/t"
        assert proxy.seen[0].headers["Proxy-Authorization"] == "Basic dXNlcjpwYSBzcw=="  # user:pa ss
        assert proxy.seen[0].headers["Host"] == "keruta-api.example:8080"
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        with KerutaClient(proxy.url, "tok", retry_seconds=0) as api:
            api.get_task("t")
        assert proxy.seen[1].path == "/api/v1/tasks/t"


def test_a_token_that_cannot_be_a_header_is_a_refusal_not_a_retry() -> None:
    with scripted([]) as server:
        api = KerutaClient(server.url, "tok\r\nX-Evil: 1", retry_seconds=30, sleep=pytest.fail)
        with api, pytest.raises(ApiRejected) as refused:
            api.get_task("t")
    assert refused.value.permanent and server.seen == []



@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (certificate, key)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def _tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def test_https_is_verified_against_ssl_cert_file_and_an_unknown_certificate_is_unreachable(
        certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    with scripted(lambda _seen: Answer(json={"id": "t"}), tls=_tls(certificate)) as server:
        with KerutaClient(server.url, "tok", retry_seconds=0) as api, pytest.raises(ApiError) as failed:
            api.get_task("t")  # certifi's bundle does not know this certificate
        assert not isinstance(failed.value, ApiRejected) and "CERTIFICATE_VERIFY_FAILED" in str(failed.value)
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
        with KerutaClient(server.url, "tok", retry_seconds=0) as api:
            assert api.get_task("t") == {"id": "t"}
            assert api.get_task("t") == {"id": "t"}
    assert len(server.seen) == 2 and server.connections == 1


HTTPS_AGENT = """
import sys
from keruta_prefect.client import KerutaClient
with KerutaClient(sys.argv[1], "tok", retry_seconds=0) as plain:
    plain.get_task("t")
with KerutaClient(sys.argv[2], "tok", retry_seconds=0) as tls:
    print(tls.get_task("t")["id"])
"""


def test_an_agent_process_speaks_to_an_http_and_an_https_api(certificate: tuple[Path, Path]) -> None:
    with (scripted(lambda _seen: Answer(json={"id": "plain"})) as plain,
          scripted(lambda _seen: Answer(json={"id": "tls"}), tls=_tls(certificate)) as tls):
        done = subprocess.run([sys.executable, "-c", HTTPS_AGENT, plain.url, tls.url], capture_output=True, text=True,
                              env={**os.environ, "SSL_CERT_FILE": str(certificate[0])}, timeout=60)
    assert (done.returncode, done.stdout) == (0, "tls\n"), done.stderr


def test_an_answer_that_announces_a_huge_body_is_a_broken_answer_never_a_memory_error() -> None:
    """A Content-Length of a terabyte (a proxy's or a broken server's answer) is retried as a broken answer;
    the client never allocates what it announces."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        for _ in range(3):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000000000000\r\n\r\n{}")

    threading.Thread(target=answer, daemon=True).start()
    api, _ = client(f"http://127.0.0.1:{server.getsockname()[1]}", retry_seconds=0)
    with server, api, pytest.raises(ApiError, match=r"an answer of 1000000000000 bytes") as failed:
        api.get_task("t")
    assert not isinstance(failed.value, ApiRejected)


def test_a_ca_file_that_does_not_exist_is_a_refusal_naming_it_not_a_retry(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    api, sleeps = client("https://127.0.0.1:9", retry_seconds=30)
    with api, pytest.raises(ApiRejected, match=r"SSL_CERT_FILE='.*missing\.pem': no such file"):
        api.get_task("t")
    assert sleeps == []
