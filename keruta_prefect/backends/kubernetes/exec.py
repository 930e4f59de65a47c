"""Collect a directory from a running agent container: `tar` over the exec WebSocket, streamed.

The archive is read frame by frame from the WebSocket's stdout channel straight into the safe
extractor (keruta_prefect.artifacts.extract_tar_stream): it is never whole in memory, and the caps
apply while it streams. The exec's own status (channel 3) and stderr tell why a collection failed;
an exec without that status (the connection broke, perhaps right between two files) keeps nothing.
"""

from __future__ import annotations

import collections
import io
import json
from pathlib import Path

import kubernetes.client
from kubernetes.stream import stream
from kubernetes.stream.ws_client import WSClient, _IgnoredIO
from websocket import ABNF, WebSocketConnectionClosedException, WebSocketException, WebSocketTimeoutException

from keruta_prefect.artifacts import ArchiveRejected, CollectResult, extract_tar_stream
from keruta_prefect.backends.kubernetes.api import BadRequest, Forbidden, KubeError, NotFound, translated
from keruta_prefect.backends.kubernetes.client import exec_client
from keruta_prefect.errors import PermanentError

STDOUT, STDERR, ERROR = 1, 2, 3  # the exec WebSocket's channels (the first byte of each frame)
STDERR_TAIL = 4096  # bytes of the command's stderr kept, from its end (tar's last words explain a failure)
MESSAGE_LIMIT = 200  # characters of a refusal's text in "artifacts lost: …"


class ArtifactsLost(PermanentError, RuntimeError):
    """The files could not be collected; ``str()`` is the reason, for "artifacts lost: <reason>"."""


class ContainerGone(ArtifactsLost):
    """The exec was refused because the Pod is gone (404) or its container has stopped (400)."""


class _ExecReader(io.RawIOBase):
    """The exec's stdout channel as a readable byte stream; stderr (its tail) and the status aside.

    Frames are taken one at a time from the client's WebSocket: WSClient.update() would drain every
    frame already available into one growing bytes object (quadratic, and the whole archive in memory
    when the sender is faster than the reader). Here memory holds only what the extractor has not read:
    ``read1`` hands over a frame's payload as it is (a view, no copy).
    Every read waits at most ``timeout`` seconds: an exec that sends nothing for that long is stalled.
    """

    def __init__(self, client: object, timeout: float) -> None:
        self.socket = client.sock  # type: ignore[attr-defined]
        self.socket.settimeout(timeout)
        self.timeout = timeout
        self.chunks: collections.deque[memoryview] = collections.deque()
        self.stderr = b""
        self.status = b""
        self.closed_by_server = False
        self.stalled = False  # nothing came for `timeout` seconds
        self.dropped: str | None = None  # the connection broke (not a close by the server)

    def readable(self) -> bool:
        return True

    def _pull(self) -> None:
        try:
            opcode, frame = self.socket.recv_data_frame(True)
        except WebSocketTimeoutException:
            self.stalled = True
            self.closed_by_server = True
            return
        except WebSocketConnectionClosedException:
            self.closed_by_server = True
            return
        except (WebSocketException, OSError) as exc:
            self.dropped = f"{type(exc).__name__}: {exc}"
            self.closed_by_server = True
            return
        if opcode == ABNF.OPCODE_CLOSE:
            self.closed_by_server = True
            return
        data = frame.data
        if not data:
            return
        channel, payload = data[0], memoryview(data)[1:]
        if channel == STDOUT and payload:
            self.chunks.append(payload)
        elif channel == STDERR:
            self.stderr = (self.stderr + payload)[-STDERR_TAIL:]
        elif channel == ERROR:
            self.status += payload

    def read1(self, size: int = -1, /) -> memoryview:
        """What came in the next frame(s), up to ``size`` bytes; empty at the end. No copy is made: the
        extractor hashes and writes the frame's own bytes."""
        while not self.chunks and not self.closed_by_server:
            self._pull()
        if not self.chunks:
            return memoryview(b"")
        head = self.chunks[0]
        if 0 <= size < len(head):
            self.chunks[0] = head[size:]
            return head[:size]
        return self.chunks.popleft()

    def readinto(self, target: memoryview | bytearray) -> int:  # type: ignore[override]  # typeshed: Buffer
        piece = self.read1(len(target))
        target[:len(piece)] = piece
        return len(piece)

    def drain(self) -> None:
        while not self.closed_by_server:
            self._pull()


def _refusal(exc: KubeError, pod: str) -> ArtifactsLost:
    if isinstance(exc, Forbidden):
        return ArtifactsLost(f"exec into Pod {pod} is forbidden: grant `create` on `pods/exec` "
                             "(deployments/rbac.yaml), or set keruta.artifacts.mode=upload")
    if isinstance(exc, NotFound):
        return ContainerGone(f"the Pod {pod} is gone (deleted before its files were collected)")
    if isinstance(exc, BadRequest):
        return ContainerGone(f"the agent container of Pod {pod} is not running any more")
    return ArtifactsLost(f"exec into Pod {pod} failed: {exc.detail.strip()[:MESSAGE_LIMIT]}")


def exec_command(api: kubernetes.client.ApiClient, namespace: str, pod: str, command: list[str],
                 container: str = "main", timeout: float = 30) -> WSClient:
    """Start ``command`` in the container; the caller reads the returned WSClient and closes it.

    One exec ApiClient per cluster connection (see client.exec_client), never a new one per call."""
    exec_api, lock = exec_client(api)
    if not lock.acquire(timeout=timeout):
        raise ArtifactsLost(f"exec into Pod {pod} could not start: another exec has been connecting for {timeout:g}s")
    try:
        # stream() turns every failure to connect into an ApiException (status 0, the handshake's status in
        # its context): translated() maps it by that status like any other request.
        with translated(f"exec into Pod {namespace}/{pod}"):
            connect = kubernetes.client.CoreV1Api(exec_api).connect_get_namespaced_pod_exec
            client: WSClient = stream(connect, pod, namespace, command=command, container=container, stdin=False,
                                      stdout=True, stderr=True, tty=False, _preload_content=False, binary=True,
                                      _request_timeout=timeout)
    except KubeError as exc:
        raise _refusal(exc, pod) from exc
    finally:
        lock.release()
    # stream() does not pass capture_all on: without this the client keeps a copy of everything it reads
    # (the whole archive) in memory. Nothing was read yet, so dropping the capture loses nothing.
    client._all = _IgnoredIO()  # type: ignore[assignment]  # the client's own no-capture sink (untyped)
    return client


def collect_directory(api: kubernetes.client.ApiClient, namespace: str, pod: str, source: str, dest: Path, *,
                      max_file_size: int, max_total_size: int, timeout: float = 60) -> CollectResult:
    """`tar cf - -C <source> .` in the agent container, extracted safely into ``dest`` as it streams.

    Raises ArtifactsLost (stalled: nothing for ``timeout`` seconds; the connection dropped before tar's
    exit status came; tar failed) or ArchiveRejected; OSError when ``dest`` cannot be written."""
    client = exec_command(api, namespace, pod, ["tar", "cf", "-", "-C", source, "."], timeout=timeout)
    rejected: ArchiveRejected | None = None
    result = CollectResult()
    try:
        reader = _ExecReader(client, timeout)
        try:
            result = extract_tar_stream(reader, dest, max_file_size=max_file_size,  # type: ignore[arg-type]
                                        max_total_size=max_total_size)  # read1: frames as they come
        except ArchiveRejected as exc:
            rejected = exc
        reader.drain()
    finally:
        close(client)
    try:
        if reader.stalled:
            raise ArtifactsLost(f"the exec into Pod {pod} sent nothing for {timeout:g}s (stalled); "
                                "the files were not collected")
        status = _status(reader.status)
        if not status:  # it always comes (channel 3) before a proper close: without it the archive may be cut
            why = reader.dropped or "closed without tar's exit status"
            raise ArtifactsLost(f"the connection to Pod {pod} broke while its files were sent ({why}); "
                                "nothing was kept")
        if status.get("status") != "Success":  # tar's own failure explains a short archive best
            stderr = reader.stderr.decode("utf-8", "replace").strip().splitlines()
            raise ArtifactsLost(f"tar in Pod {pod} failed: {status.get('message', '')}"
                                + (f" ({stderr[-1]})" if stderr else ""))
    except ArtifactsLost:
        for item in result.files:  # what an incomplete archive delivered is not kept either
            (dest / item.path).unlink(missing_ok=True)
        raise
    if rejected is not None:
        raise rejected
    return result


def release(api: kubernetes.client.ApiClient, namespace: str, pod: str, path: str, timeout: float) -> str | None:
    """`touch <path>` in the container (the agent's signal to exit); None when done, else why not.
    Never raises; the WebSocket is closed in every case."""
    try:
        client = exec_command(api, namespace, pod, ["touch", path], timeout=timeout)
    except ArtifactsLost as exc:
        return str(exc)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        reader = _ExecReader(client, timeout)
        reader.drain()
        if reader.stalled:
            return f"touch in Pod {pod} answered nothing for {timeout:g}s"
        status = _status(reader.status)
        if status.get("status") != "Success":
            return f"touch in Pod {pod} failed: {status.get('message') or reader.dropped or 'no exit status'}"
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        close(client)


def close(client: WSClient) -> None:
    """Close the exec's WebSocket and its socket. (websocket-client's close() returns early once the
    server's close frame has been read, leaving the socket open until garbage collection: shutdown()
    closes it now.)"""
    try:
        client.close()
    finally:
        if client.sock is not None:
            client.sock.shutdown()


def _status(raw: bytes) -> dict[str, object]:
    try:
        found = json.loads(raw.decode("utf-8")) if raw else {}
        return found if isinstance(found, dict) else {}
    except ValueError:
        return {}
