"""Real kubectl processes exec into a harness Pod and copy files out of it and into it, over each transport
kubectl speaks: 1.27 SPDY/3.1, 1.33 (and the default kubectl) a WebSocket with v5.channel.k8s.io, and 1.33
forced back to SPDY (KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false), as it falls back when the upgrade fails.
kubectl is an independent witness: it checks what the harness' exec serves, not our own client."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from keruta_harness import exec as exec_
from keruta_harness import spdy
from keruta_harness.cluster import PODS, Cluster

pytestmark = pytest.mark.harness_only("the harness's exec transports, held to kubectl")


@dataclass(frozen=True)
class Kubectl:
    version: str  # "" for the kubectl on PATH
    env: tuple[tuple[str, str], ...]
    transport: str  # what the harness saw: "<transport>/<protocol>"

    @property
    def binary(self) -> str:
        found = shutil.which("kubectl")
        if found is None:
            pytest.fail("kubectl is not on PATH: it is installed on every machine of this project's kind "
                        "(with kubectl.1.27 … kubectl.1.33 beside it)")
        binary = Path(found).resolve().parent / f"kubectl.{self.version}" if self.version else Path(found)
        if not binary.is_file():
            pytest.fail(f"{binary} is missing: kubectl 1.27 … 1.33 are installed beside the kubectl on PATH")
        return str(binary)


CLIENTS = [
    pytest.param(Kubectl("1.27", (), "spdy/v4.channel.k8s.io"), id="1.27-spdy"),
    pytest.param(Kubectl("1.33", (), "websocket/v5.channel.k8s.io"), id="1.33-websocket"),
    pytest.param(Kubectl("1.33", (("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false"),), "spdy/v5.channel.k8s.io"),
                 id="1.33-spdy"),
    pytest.param(Kubectl("", (), "websocket/v5.channel.k8s.io"), id="default-websocket"),
]
POD = "worker"


@pytest.fixture
def pod(manual_cluster: Cluster) -> Path:
    """A running Pod whose main container mounts an emptyDir at /data; returns the volume's directory."""
    manual_cluster.call(manual_cluster.put(PODS, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD, "namespace": "default"},
        "spec": {"containers": [{"name": "main", "image": "busybox",
                                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                 "volumes": [{"name": "data", "emptyDir": {}}]}}))
    manual_cluster.run_pod(POD)
    volume = manual_cluster.root / "pods" / "default" / POD / "data"
    volume.mkdir(parents=True, exist_ok=True)
    return volume


def kubectl(cluster: Cluster, client: Kubectl, *args: str, cwd: Path | None = None,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, **dict(client.env)}
    command = [client.binary, "--kubeconfig", str(cluster.kubeconfig()), "--cache-dir",
               str(cluster.root / "kubectl-cache"), *args]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=60, env=env, cwd=cwd,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` by its relative path, with its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def some_files(root: Path) -> dict[str, str]:
    """A binary file of several frames, a dotfile, an empty file and a nested one under ``root``."""
    files = {"blob.bin": os.urandom(3 * 2**20 + 17), ".hidden": b"dot\n", "empty": b"",
             "nested/deeper/note.txt": "ünïcode\n".encode()}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return tree(root)


@pytest.mark.parametrize("client", CLIENTS)
def test_exec_prints_the_commands_stdout(manual_cluster: Cluster, pod: Path, client: Kubectl) -> None:
    done = kubectl(manual_cluster, client, "exec", POD, "--", "echo", "hi")
    assert (done.returncode, done.stdout) == (0, b"hi\n"), done.stderr.decode()
    assert manual_cluster.exec_commands == [["echo", "hi"]]
    assert manual_cluster.exec.transports == [client.transport]


@pytest.mark.parametrize("client", CLIENTS)
def test_exec_passes_on_stderr_and_the_exit_code(manual_cluster: Cluster, pod: Path, client: Kubectl) -> None:
    done = kubectl(manual_cluster, client, "exec", POD, "--", "sh", "-c", "echo out; echo oops >&2; exit 3")
    assert done.returncode == 3, done.stderr.decode()
    assert done.stdout == b"out\n"
    assert done.stderr.decode().splitlines() == ["oops", "command terminated with exit code 3"]


@pytest.mark.parametrize("client", CLIENTS)
def test_exec_with_stdin_gets_it_whole_and_ends_it(manual_cluster: Cluster, pod: Path, client: Kubectl) -> None:
    data = os.urandom(2 * 2**20 + 5)  # many frames, more than the server holds at once
    done = kubectl(manual_cluster, client, "exec", "-i", POD, "--", "cat", stdin=data)
    assert done.returncode == 0, done.stderr.decode()
    assert hashlib.sha256(done.stdout).hexdigest() == hashlib.sha256(data).hexdigest()  # cat ended: stdin did


@pytest.mark.parametrize("client", CLIENTS)
def test_cp_out_of_the_pod_brings_every_file_byte_identical(manual_cluster: Cluster, pod: Path, client: Kubectl,
                                                            tmp_path: Path) -> None:
    expected = some_files(pod / "out")
    done = kubectl(manual_cluster, client, "cp", f"{POD}:/data/out", "local", cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert tree(tmp_path / "local") == expected
    assert manual_cluster.exec_commands == [["tar", "cf", "-", "/data/out"]]
    # the volume's mount point itself, as a user copies an agent's whole artifacts directory
    done = kubectl(manual_cluster, client, "cp", f"{POD}:/data", "whole", cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert tree(tmp_path / "whole") == {f"out/{name}": digest for name, digest in expected.items()}


@pytest.mark.parametrize("client", CLIENTS)
def test_cp_into_the_pod_sends_every_file_over_stdin(manual_cluster: Cluster, pod: Path, client: Kubectl,
                                                     tmp_path: Path) -> None:
    expected = some_files(tmp_path / "local")
    (pod / "in").mkdir()
    done = kubectl(manual_cluster, client, "cp", "local", f"{POD}:/data/in", cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert tree(pod / "in" / "local") == expected
    assert manual_cluster.exec_commands == [["test", "-d", "/data/in"], ["tar", "-xmf", "-", "-C", "/data/in"]]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_connection_broken_mid_stream(manual_cluster: Cluster, pod: Path, client: Kubectl) -> None:
    """The harness' break fault on both transports: `after` bytes of stdout, then the connection drops with
    no status. kubectl over a WebSocket fails; over SPDY it exits 0 with the cut output, as client-go reads
    an error stream that ends empty as success (keruta-prefect's own collector requires the status)."""
    (pod / "big").write_bytes(os.urandom(2**20))
    after = 100_000
    manual_cluster.break_exec(after)
    done = kubectl(manual_cluster, client, "exec", POD, "--", "cat", "/data/big")
    assert done.stdout == (pod / "big").read_bytes()[:after]
    if client.transport.startswith("websocket/"):
        assert done.returncode == 1
        assert "error reading from error stream" in done.stderr.decode()
    else:
        assert done.returncode == 0, done.stderr.decode()


def test_a_spdy_client_offering_no_protocol_the_server_speaks_is_refused(manual_cluster: Cluster, pod: Path) -> None:
    """403 with the protocols the server accepts, as from the kubelet; and no upgrade at all is a 400."""
    url = f"{manual_cluster.url}/api/v1/namespaces/default/pods/{POD}/exec?command=true&stdout=true"
    refused = httpx.post(url, headers={"Connection": "Upgrade", "Upgrade": "SPDY/3.1",
                                       "X-Stream-Protocol-Version": "v3.channel.k8s.io"})
    assert refused.status_code == 403
    assert refused.headers["X-Accepted-Stream-Protocol-Versions"] == "v5.channel.k8s.io, v4.channel.k8s.io"
    assert refused.text.startswith("unable to upgrade: unable to negotiate protocol")
    assert httpx.post(url).status_code == 400
    assert manual_cluster.exec_commands == []


def test_a_spdy_session_frame_by_frame(manual_cluster: Cluster, pod: Path) -> None:
    """What kubectl's short execs do not show: the server echoes the client's PING, and ends with FIN on
    every stream, the status on the error stream, then GOAWAY naming the last stream it took."""
    host, port = manual_cluster.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(f"POST /api/v1/namespaces/default/pods/{POD}/exec?command=cat&stdin=true&stdout=true"
                     "&stderr=true HTTP/1.1\r\nHost: harness\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                     "X-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n" in head
        client = zlib.compressobj(zdict=spdy.DICTIONARY)
        sock.sendall(b"".join(syn_stream(client, i, kind) for i, kind in
                              ((1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")))
                     + spdy.FrameWriter().ping(1) + spdy.FrameWriter.data(3, b"hello", fin=True))
        reader, frames = spdy.FrameReader(), list[spdy.Frame]()
        while not frames or not isinstance(frames[-1], spdy.GoAway):
            data = sock.recv(65536)
            assert data, f"the server closed before its GOAWAY: {frames}"
            frames += reader.feed(data)
    status = json.dumps({"metadata": {}, "status": "Success"}).encode()
    assert frames == [*(spdy.SynReply(i, {}, False) for i in (1, 3, 5, 7)), spdy.Ping(1),
                      spdy.Data(5, b"hello", False), spdy.Data(5, b"", True), spdy.Data(7, b"", True),
                      spdy.Data(3, b"", True), spdy.Data(1, status, True), spdy.GoAway(7, spdy.GOAWAY_OK)]
    assert manual_cluster.exec.transports == ["spdy/v4.channel.k8s.io"]


# --- the pure parts --------------------------------------------------------------------------------------

def test_the_header_dictionary_is_spdy3s() -> None:
    """Its Adler-32 is the DICTID every SPDY/3 peer's zlib stream names (Go's spdystream's dictionary too):
    a wrong byte and no header block would decompress."""
    assert (len(spdy.DICTIONARY), zlib.adler32(spdy.DICTIONARY)) == (1423, 0xE3C6A7C2)


def syn_stream(client: zlib._Compress, stream_id: int, kind: str) -> bytes:
    """A client's SYN_STREAM for a stream of ``kind`` (``client``: its header stream, one per connection)."""
    block = client.compress(spdy.encode_headers({"streamType": kind})) + client.flush(zlib.Z_SYNC_FLUSH)
    payload = struct.pack(">IIBB", stream_id, 0, 0, 0) + block
    return struct.pack(">HHI", 0x8000 | spdy.VERSION, spdy.SYN_STREAM, len(payload)) + payload


def test_frames_come_out_whole_however_the_bytes_are_cut() -> None:
    client = zlib.compressobj(zdict=spdy.DICTIONARY)
    server = spdy.FrameWriter()
    wire = (syn_stream(client, 1, "error") + syn_stream(client, 3, "stdin") + server.data(3, b"abc", fin=True)
            + server.ping(7) + server.rst_stream(3, spdy.RST_CANCEL) + server.goaway(3))
    reader = spdy.FrameReader()
    frames = [frame for i in range(len(wire)) for frame in reader.feed(wire[i:i + 1])]
    assert frames == [spdy.SynStream(1, {"streamtype": "error"}, False),
                      spdy.SynStream(3, {"streamtype": "stdin"}, False), spdy.Data(3, b"abc", True),
                      spdy.Ping(7), spdy.RstStream(3, spdy.RST_CANCEL), spdy.GoAway(3, 0)]
    # the server's header blocks share one zlib stream too: a second SYN_REPLY decodes after the first
    replies = spdy.FrameReader().feed(server.syn_reply(1) + server.syn_reply(3, {"x": "y"}, fin=True))
    assert replies == [spdy.SynReply(1, {}, False), spdy.SynReply(3, {"x": "y"}, True)]


def test_what_an_exec_request_asks_for() -> None:
    options = exec_.ExecOptions.of({"stdin": "true", "stdout": "1", "stderr": "True"}, ["cat"])
    assert options.streams() == {"error", "stdin", "stdout", "stderr"}
    assert exec_.ExecOptions.of({"stdout": "true", "tty": "true", "stderr": "true"}, ["sh"]).streams() == \
        {"error", "stdout", "resize"}
    assert exec_.ExecOptions.of({}, ["true"]).problem() == "you must specify at least 1 of stdin, stdout, stderr"
    assert exec_.ExecOptions.of({"stdout": "true"}, []).problem() == "you must specify at least 1 command"
    assert exec_.negotiate(["v4.channel.k8s.io", "v5.channel.k8s.io"]) == "v4.channel.k8s.io"  # the client's order
    assert exec_.negotiate(["v3.channel.k8s.io", "channel.k8s.io"]) is None
    assert exec_.exit_status(0) == {"metadata": {}, "status": "Success"}
    assert exec_.exit_status(3)["details"] == {"causes": [{"reason": "ExitCode", "message": "3"}]}


def test_arguments_under_a_mount_are_seen_from_the_containers_root(tmp_path: Path) -> None:
    mounts = {"/data": tmp_path / "vol-a", "/.keruta/doc": tmp_path / "vol-b", "/data/inner": tmp_path / "vol-c"}
    for path in mounts.values():
        path.mkdir()
    placed = exec_.root_view(tmp_path / "root", mounts)
    assert placed == {"/data": mounts["/data"], "/.keruta/doc": mounts["/.keruta/doc"]}  # inner: inside vol-a
    assert (tmp_path / "root" / ".keruta" / "doc").resolve() == mounts["/.keruta/doc"]
    assert [exec_.in_view(a, placed, mounts) for a in ("/data/out", "/data", "/.keruta/doc", "-C", "/data/inner/x",
                                                        "/elsewhere")] == \
        ["data/out", "data/.", ".keruta/doc/.", "-C", str(mounts["/data/inner"] / "x"), "/elsewhere"]
