"""Collect a directory from a running agent container: `tar` over the exec WebSocket, streamed.

The archive is read frame by frame from the WebSocket's stdout channel straight into the safe
extractor (keruta_prefect.artifacts.extract_tar_stream): it is never whole in memory, and the caps
apply while it streams. The exec's own status (channel 3) and stderr tell why a collection failed.
"""

from __future__ import annotations

import collections
import io
import json
import re
from pathlib import Path

import kubernetes.client
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import stream
from kubernetes.stream.ws_client import _IgnoredIO
from websocket import ABNF, WebSocketConnectionClosedException

from keruta_prefect.artifacts import ArchiveRejected, CollectResult, extract_tar_stream

STDOUT, STDERR, ERROR = 1, 2, 3


class ArtifactsLost(RuntimeError):
    """The files could not be collected; ``str()`` is the reason, for "artifacts lost: <reason>"."""


class _ExecReader(io.RawIOBase):
    """The exec's stdout channel as a readable byte stream; stderr (its tail) and the status aside.

    Frames are taken one at a time from the client's WebSocket: WSClient.update() would drain every
    frame already available into one growing bytes object (quadratic, and the whole archive in memory
    when the sender is faster than the reader). Here memory holds only what the extractor has not read.
    """

    def __init__(self, client: object, timeout: float) -> None:
        self.socket = client.sock  # type: ignore[attr-defined]
        self.socket.settimeout(timeout)
        self.chunks: collections.deque[bytes] = collections.deque()
        self.offset = 0
        self.stderr = b""
        self.status = b""
        self.closed_by_server = False

    def readable(self) -> bool:
        return True

    def _pull(self) -> None:
        try:
            opcode, frame = self.socket.recv_data_frame(True)
        except (WebSocketConnectionClosedException, OSError):
            self.closed_by_server = True
            return
        if opcode == ABNF.OPCODE_CLOSE:
            self.closed_by_server = True
            return
        data = frame.data
        if not data:
            return
        channel, payload = data[0], data[1:]
        if channel == STDOUT and payload:
            self.chunks.append(payload)
        elif channel == STDERR:
            self.stderr = (self.stderr + payload)[-4096:]
        elif channel == ERROR:
            self.status += payload

    def readinto(self, target: bytearray) -> int:  # type: ignore[override]
        while not self.chunks and not self.closed_by_server:
            self._pull()
        if not self.chunks:
            return 0
        head = self.chunks[0]
        size = min(len(target), len(head) - self.offset)
        target[:size] = memoryview(head)[self.offset:self.offset + size]
        self.offset += size
        if self.offset == len(head):
            self.chunks.popleft()
            self.offset = 0
        return size

    def drain(self) -> None:
        while not self.closed_by_server:
            self._pull()


def _refusal(exc: ApiException, pod: str) -> ArtifactsLost:
    text = f"{exc.reason or ''} {exc.body or ''}"
    found = re.search(r"\b(4\d\d|5\d\d)\b", text)
    status = int(found[1]) if found else exc.status
    if status == 403:
        return ArtifactsLost(f"exec into Pod {pod} is forbidden: grant `create` on `pods/exec` "
                             "(deployments/rbac.yaml), or set keruta.artifacts.mode=upload")
    if status == 404:
        return ArtifactsLost(f"the Pod {pod} is gone (deleted before its files were collected)")
    if status == 400:
        return ArtifactsLost(f"the agent container of Pod {pod} is not running any more")
    return ArtifactsLost(f"exec into Pod {pod} failed: {text.strip()[:200]}")


def exec_command(api: kubernetes.client.ApiClient, namespace: str, pod: str, command: list[str],
                 container: str = "main", timeout: float = 30) -> object:
    # A client of its own: kubernetes.stream.stream() swaps call_api on the ApiClient it is given for the
    # length of the call, which would send the shared client's concurrent requests (watches, logs) over
    # a WebSocket too.
    core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(api.configuration))
    try:
        client = stream(core.connect_get_namespaced_pod_exec, pod, namespace, command=command, container=container,
                        stdin=False, stdout=True, stderr=True, tty=False, _preload_content=False, binary=True,
                        _request_timeout=timeout)
    except ApiException as exc:
        raise _refusal(exc, pod) from None
    # stream() does not pass capture_all on: without this the client keeps a copy of everything it reads
    # (the whole archive) in memory. Nothing was read yet, so dropping the capture loses nothing.
    client._all = _IgnoredIO()  # type: ignore[attr-defined]
    return client


def collect_directory(api: kubernetes.client.ApiClient, namespace: str, pod: str, source: str, dest: Path, *,
                      max_file_size: int, max_total_size: int, timeout: float = 60) -> CollectResult:
    """`tar cf - -C <source> .` in the agent container, extracted safely into ``dest`` as it streams."""
    client = exec_command(api, namespace, pod, ["tar", "cf", "-", "-C", source, "."], timeout=timeout)
    reader = _ExecReader(client, timeout)
    rejected: ArchiveRejected | None = None
    result = CollectResult()
    try:
        try:
            result = extract_tar_stream(io.BufferedReader(reader, 1 << 20), dest, max_file_size=max_file_size,
                                        max_total_size=max_total_size)
        except ArchiveRejected as exc:
            rejected = exc
        reader.drain()
    finally:
        client.close()  # type: ignore[attr-defined]
    status = _status(reader.status)
    if status.get("status") not in (None, "Success"):  # tar's own failure explains a short archive best
        stderr = reader.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ArtifactsLost(f"tar in Pod {pod} failed: {status.get('message', '')}"
                            + (f" ({stderr[-1]})" if stderr else ""))
    if rejected is not None:
        raise rejected
    return result


def _status(raw: bytes) -> dict[str, object]:
    try:
        return json.loads(raw.decode("utf-8")) if raw else {}
    except ValueError:
        return {}
