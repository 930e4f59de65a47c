"""`pods/exec` as the kubelet serves it behind the API server, over both transports kubectl speaks; the
command runs locally, in a view of the container's filesystem (its volume mounts at their paths).

Which transport each client uses (`kubectl -v=8` against this harness; tests/test_harness_exec_kubectl.py):
- kubectl 1.27 (… 1.29): SPDY/3.1, offering v4.channel.k8s.io, v3, v2 and channel.k8s.io; it gets v4;
- kubectl ≥ 1.30 (1.32 on PATH, 1.33): a WebSocket first, offering only v5.channel.k8s.io; SPDY/3.1 (v5
  first, then v4 … channel.k8s.io) when the upgrade fails, and always with KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false;
- the official Python client (keruta-prefect's own collector): a WebSocket, offering
  `v5.channel.k8s.io,v4.channel.k8s.io` in one header line; it gets v5.

The WebSocket: `GET …/exec?command=…&container=…&stdin=true&stdout=true&stderr=true` with `Upgrade:
websocket` and `Sec-WebSocket-Protocol` listing subprotocols; the server picks the first of the client's
it speaks. Every binary message starts with its channel: 0 stdin, 1 stdout, 2 stderr, 3 the status, 4
resize. v5 adds 255, "close", whose payload names the channel the client has ended ([255, 0]: end of
stdin), since a WebSocket has no half-close. The server sends the status on channel 3, then a close frame
1000: client-go reads stdout/stderr until the connection closes, and any other close (1006 when the
connection just drops) fails the exec with "error reading from error stream". client-go pings every 5 s
and gives up after 61 s without a pong, so the server always has a receive() pending (aiohttp answers
pings inside it), except while the command is not taking the stdin it holds.

SPDY/3.1 (spdy.py has the framing): the same query, `POST` with `Connection: Upgrade`, `Upgrade: SPDY/3.1`,
`Content-Length: 0` and one `X-Stream-Protocol-Version` line per protocol. aiohttp's parser knows only
WebSocket upgrades, so this arrives as a plain request; the session becomes the connection's parser
(aiohttp's own WebSockets take it over the same way) before the 101 goes out, as the client sends its
first frame only after reading it. The 101 carries `Connection: Upgrade`, `Upgrade: SPDY/3.1` and the
chosen `X-Stream-Protocol-Version` (without it client-go falls back to protocol v1). The client opens one
stream per kind, each a SYN_STREAM whose `streamtype` header is error, stdin, stdout, stderr or resize:
error always, the others as `stdin`/`stdout`/`stderr`/`tty` ask. The server replies to each with an empty
SYN_REPLY (the client gives up on a stream after 30 s without one) and starts the command once all have
come. stdin is the stdin stream's DATA frames, its end the client's FIN. The server writes stdout/stderr
as DATA frames, ends each with FIN (client-go copies them until EOF), writes the status with FIN on the
error stream, sends GOAWAY naming the last stream it took, and closes when the client has gone. kubectl
then resets its streams (RST_STREAM) and closes the socket; it sends no GOAWAY, SETTINGS or WINDOW_UPDATE
(spdystream does no flow control, so neither does this server), and PINGs every 5 s with odd ids, which
the server echoes. A connection broken mid-stream leaves the error stream empty, which client-go reads as
success: kubectl exits 0 with the cut output (keruta-prefect's own collector requires the status).

Both carry the status as a v4 `metav1.Status` JSON: `Success`, or `Failure` with reason `NonZeroExitCode`
and a cause `{"reason": "ExitCode", "message": "<code>"}` (kubectl exits with that code and prints
"command terminated with exit code N"). The harness serves v5 and v4 only (for exec they differ only in
the WebSocket's close signal); a client offering neither gets 403, as from the kubelet.

The command runs with a stdin pipe only when the client asked for stdin, closed at the client's end of
stdin; a client that goes before the command ends takes it with it. Its working directory is a view of
the container's root: each volume mount is a symlink at its path there, and arguments under a mount
become paths relative to that root (`/data/x` → `data/x`; the mount itself → `data/.`), so that `tar cf -
/data/x` names its members `data/x/…` as in a container: `kubectl cp POD:/data/x` runs exactly that and
refuses members that do not start with the path less its leading `/` ("tar contents corrupted");
`kubectl cp DIR POD:/data/in` runs `test -d /data/in`, then `tar -xmf - -C /data/in` with the archive on
stdin. kubectl cp reads the Pod directly, while kubectl exec resolves it through API discovery even for a
bare Pod name. Faults, on both transports: an exec that stalls after the upgrade, and a connection broken
mid-stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import aiohttp.web
import kmock

from . import containers, spdy
from .common import container_state, error, pod_container, raw_request
from .faults import Faults
from .kubelet import Kubelet
from .store import Store

STALL_SECONDS = 120  # how long a stalled exec holds its connection when the client never goes
STREAMS_SECONDS = 30  # how long the server waits for the client's SPDY streams (the kubelet's timeout)
CLOSE_SECONDS = 5  # how long the server waits for the client to go after the end, before it closes
PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
CHANNELS = {"stdin": 0, "stdout": 1, "stderr": 2, "error": 3, "resize": 4}  # the WebSocket channel of each
CLOSE_CHANNEL = 255  # v5: "the client has ended the channel in the payload"
CHUNK = 1 << 20  # the most of the command's output read, and sent in one message, at a time
STDIN_HELD = 64  # chunks of stdin held for the command before the client is slowed down
TRUE = {"1", "t", "true"}  # Go's ParseBool, as the API server reads the query (Python's client sends "True")


@dataclass(frozen=True)
class ExecOptions:
    """What the request asks for (the query of `pods/exec`)."""

    command: list[str]
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    @classmethod
    def of(cls, query: Mapping[str, str], command: list[str]) -> ExecOptions:
        def flag(name: str) -> bool:
            return query.get(name, "").lower() in TRUE
        return cls(command, flag("stdin"), flag("stdout"), flag("stderr"), flag("tty"))

    def problem(self) -> str | None:
        """Why the API server refuses the request (400), or None."""
        if not self.command:
            return "you must specify at least 1 command"
        if not (self.stdin or self.stdout or self.stderr):
            return "you must specify at least 1 of stdin, stdout, stderr"
        return None

    def streams(self) -> set[str]:
        """The SPDY streams the client opens: error always; the standard streams it asked for; with a TTY,
        resize and no stderr (a terminal has one output)."""
        wanted = {"error", *(s for s in ("stdin", "stdout") if getattr(self, s))}
        if self.tty:
            return wanted | {"resize"}
        return wanted | ({"stderr"} if self.stderr else set())


def negotiate(offered: Iterable[str]) -> str | None:
    """The first protocol the client offers that the server speaks (lines may also hold lists)."""
    for line in offered:
        for protocol in line.split(","):
            if protocol.strip() in PROTOCOLS:
                return protocol.strip()
    return None


def exit_status(code: int) -> dict[str, Any]:
    """The v4 status of a command that ended with ``code``."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": f"command terminated with non-zero exit code: {code}",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def in_view(text: str, placed: Mapping[str, Path], mounts: Mapping[str, Path]) -> str:
    """An argument as the command sees it from the container's root view: a path under a mount placed
    there becomes relative (`/data/x` → `data/x`, the mount itself `data/.`, still a directory when `data`
    is a symlink); any other text is localized as the kubelet does for container commands."""
    holding = [m for m in mounts if text == m or text.startswith(m.rstrip("/") + "/")]
    innermost = max(holding, key=len, default=None)
    if innermost is not None and innermost in placed:
        rest = text[len(innermost.rstrip("/")):].lstrip("/")
        return f"{innermost.strip('/')}/{rest or '.'}"
    return containers.localize(text, dict(mounts))


def root_view(path: Path, mounts: Mapping[str, Path]) -> dict[str, Path]:
    """Make ``path`` the container's root: a symlink at each mount's path to its volume. Returns the mounts
    it could place there (one nested inside another's volume stays out: its arguments are localized)."""
    placed: dict[str, Path] = {}
    for mount in sorted(mounts, key=len):
        if any(mount.startswith(outer.rstrip("/") + "/") for outer in placed):
            continue
        link = path / mount.strip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(mounts[mount], target_is_directory=True)
        placed[mount] = mounts[mount]
    return placed


class Stdin:
    """What the client sends on stdin, held until the command takes it; None marks its end. Past
    STDIN_HELD chunks ``on_full`` runs (the transport stops reading), and ``on_room`` once it is taken."""

    def __init__(self, on_full: Callable[[], None] = lambda: None,
                 on_room: Callable[[], None] = lambda: None) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.room = asyncio.Event()
        self.room.set()
        self.ended = False
        self.on_full, self.on_room = on_full, on_room

    def put(self, data: bytes) -> None:
        if self.ended or not data:
            return
        self.queue.put_nowait(data)
        if self.queue.qsize() >= STDIN_HELD and self.room.is_set():
            self.room.clear()
            self.on_full()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.queue.put_nowait(None)

    def discard(self) -> None:
        """Nobody takes stdin any more (the command has stopped reading, or never asked for it): drop what is
        held and what comes, and let the transport read on (pings, the client's end)."""
        self.end()
        while not self.queue.empty():
            self.queue.get_nowait()
        if not self.room.is_set():
            self.room.set()
            self.on_room()

    async def get(self) -> bytes | None:
        chunk = await self.queue.get()
        if not self.room.is_set() and self.queue.qsize() < STDIN_HELD // 2:
            self.room.set()
            self.on_room()
        return chunk


class Session(Protocol):
    """One exec's connection, whichever the transport."""

    stdin: Stdin
    gone: asyncio.Event  # the client has closed its side

    async def send(self, stream: str, data: bytes) -> None: ...

    async def finish(self, status: dict[str, Any]) -> None: ...

    def abort(self) -> None: ...


class WebSocketSession:
    """An exec over a WebSocket: a reader task takes the client's messages (stdin, close signals, pings)."""

    def __init__(self, ws: aiohttp.web.WebSocketResponse, raw: aiohttp.web.BaseRequest,
                 options: ExecOptions) -> None:
        self.ws, self.raw = ws, raw
        self.stdin = Stdin()
        if not options.stdin:
            self.stdin.discard()
        self.gone = asyncio.Event()
        self._receiving = False
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                await self.stdin.room.wait()
                self._receiving = True
                try:
                    message = await self.ws.receive()
                finally:
                    self._receiving = False
                if message.type != aiohttp.WSMsgType.BINARY:
                    return  # closed by the client, closing, or an error
                data: bytes = message.data
                if data[:1] == bytes([CHANNELS["stdin"]]):
                    self.stdin.put(data[1:])
                elif data[:1] == bytes([CLOSE_CHANNEL]) and data[1:2] == bytes([CHANNELS["stdin"]]):
                    self.stdin.end()
        finally:
            self.gone.set()
            self.stdin.end()

    async def send(self, stream: str, data: bytes) -> None:
        await self.ws.send_bytes(bytes([CHANNELS[stream]]) + data)

    async def _stop_reading(self) -> None:
        if not self._receiving:  # waiting for room: nothing of aiohttp's to break
            self._reader.cancel()
        await self.ws.close()  # breaks a pending receive(); the close frame says 1000
        await asyncio.gather(self._reader, return_exceptions=True)

    async def finish(self, status: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.send("error", json.dumps(status).encode())
        await self._stop_reading()

    async def stall(self) -> None:
        """Upgraded, then nothing at all until the client goes (or STALL_SECONDS)."""
        try:
            await asyncio.wait_for(self.gone.wait(), STALL_SECONDS)
        except TimeoutError:
            pass
        await self._stop_reading()

    def abort(self) -> None:
        """The connection breaks: no status, no close frame."""
        self._reader.cancel()
        if self.raw.transport is not None:
            self.raw.transport.abort()


class SpdySession:
    """An exec over SPDY/3.1. After the 101 the connection's bytes come to ``feed_data``: it is set as the
    parser of aiohttp's protocol (as aiohttp does for its own WebSockets), before the 101 goes out, since
    the client sends its first frame only after reading it."""

    def __init__(self, raw: aiohttp.web.BaseRequest, options: ExecOptions) -> None:
        assert raw.transport is not None
        self.raw = raw
        self.transport = raw.transport
        self.expected = options.streams()
        self.frames, self.out = spdy.FrameReader(), spdy.FrameWriter()
        self.streams: dict[str, int] = {}  # stream type -> the client's stream id
        self.last_stream = 0
        self.ready = asyncio.Event()  # every stream the client was to open is open
        self.gone = asyncio.Event()
        self.stdin = Stdin(on_full=self.transport.pause_reading, on_room=self.transport.resume_reading)

    # --- aiohttp's side: the parser of the upgraded connection --------------------------------------
    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        try:
            for frame in self.frames.feed(data):
                self._on(frame)
        except spdy.ProtocolError:
            self._write(self.out.goaway(self.last_stream, spdy.GOAWAY_PROTOCOL_ERROR))
            self.abort()
        return False, b""

    def feed_eof(self) -> None:
        self._client_gone()

    def _client_gone(self) -> None:
        self.gone.set()
        self.ready.set()  # wakes a server still waiting for streams: it finds some missing
        self.stdin.end()

    def _on(self, frame: spdy.Frame) -> None:
        match frame:
            case spdy.SynStream(stream_id=stream_id, headers=headers, fin=fin):
                self.last_stream = max(self.last_stream, stream_id)
                kind = headers.get("streamtype", "")
                if kind in self.expected and kind not in self.streams:
                    self.streams[kind] = stream_id
                self._write(self.out.syn_reply(stream_id))
                if kind == "stdin" and fin:
                    self.stdin.end()
                if set(self.streams) == self.expected:
                    self.ready.set()
            case spdy.Data(stream_id=stream_id, data=data, fin=fin) if stream_id == self.streams.get("stdin"):
                self.stdin.put(data)
                if fin:
                    self.stdin.end()
            case spdy.RstStream(stream_id=stream_id) if stream_id == self.streams.get("stdin"):
                self.stdin.end()
            case spdy.Ping(id=ping_id) if ping_id % 2 == 1:  # the client's: echo it
                self._write(self.out.ping(ping_id))
            case spdy.GoAway():
                self._client_gone()
            case _:  # resize data, SETTINGS, WINDOW_UPDATE, HEADERS: nothing to do here
                pass

    # --- the exec's side ----------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    async def send(self, stream: str, data: bytes) -> None:
        stream_id = self.streams.get(stream)
        if stream_id is None:
            return
        if self.transport.is_closing():
            raise ConnectionResetError("the client has gone")
        self._write(self.out.data(stream_id, data))
        # aiohttp's protocol pauses writing when the socket's buffer is full; wait as its writers do
        await self.raw.protocol._drain_helper()

    async def finish(self, status: dict[str, Any]) -> None:
        for kind in ("stdout", "stderr", "stdin", "resize"):
            if kind in self.streams:
                self._write(self.out.data(self.streams[kind], fin=True))
        self._write(self.out.data(self.streams["error"], json.dumps(status).encode(), fin=True))
        self._write(self.out.goaway(self.last_stream))
        await self.close()

    async def close(self) -> None:
        """After the end, or after a refusal: wait for the client to go, then close."""
        try:
            await asyncio.wait_for(self.gone.wait(), CLOSE_SECONDS)
        except TimeoutError:
            pass
        self.transport.close()

    async def stall(self) -> None:
        try:
            await asyncio.wait_for(self.gone.wait(), STALL_SECONDS)
        except TimeoutError:
            pass
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()


class Exec:
    def __init__(self, store: Store, kubelet: Kubelet, faults: Faults) -> None:
        self.store = store
        self.kubelet = kubelet
        self.faults = faults
        self.commands: list[list[str]] = []  # every exec's command, as the client sent it
        self.transports: list[str] = []  # "websocket/<protocol>" or "spdy/<protocol>", one per exec

    async def serve(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        found = pod_container(self.store, request)
        if isinstance(found, aiohttp.web.Response):
            return found
        namespace, name, pod, container = found
        if "running" not in container_state(pod, container):
            return error(400, "BadRequest", f"container {container} is not valid for pod {name}: not running")
        raw = raw_request(request)
        options = ExecOptions.of(raw.query, raw.query.getall("command", []))
        if (problem := options.problem()) is not None:
            return error(400, "BadRequest", problem)
        spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
        volumes = containers.volume_paths(self.kubelet.root, namespace, name, pod["spec"])
        view = self.kubelet.root / "exec-roots" / namespace / name / container
        mounts = containers.mounts_of(spec, volumes)
        placed = root_view(view, mounts)
        argv = [in_view(part, placed, mounts) for part in options.command]

        upgrade = raw.headers.get("Upgrade", "").lower()
        session: WebSocketSession | SpdySession
        if upgrade == "websocket":
            ws = aiohttp.web.WebSocketResponse(protocols=PROTOCOLS)
            await ws.prepare(raw)
            self.transports.append(f"websocket/{ws.ws_protocol}")
            session = WebSocketSession(ws, raw, options)
            response: aiohttp.web.StreamResponse = ws
        elif upgrade == "spdy/3.1":
            offered = raw.headers.getall("X-Stream-Protocol-Version", [])
            protocol = negotiate(offered)
            if protocol is None:
                return aiohttp.web.Response(
                    status=403, headers={"X-Accepted-Stream-Protocol-Versions": ", ".join(PROTOCOLS)},
                    text=f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                         f"server accepts {list(PROTOCOLS)}")
            session = SpdySession(raw, options)
            raw.protocol.set_parser(session)  # type: ignore[arg-type]  # any object with feed_data/feed_eof
            raw.protocol.keep_alive(False)
            response = aiohttp.web.StreamResponse(status=101, headers={
                "Connection": "Upgrade", "Upgrade": "SPDY/3.1", "X-Stream-Protocol-Version": protocol})
            await response.prepare(raw)
            self.transports.append(f"spdy/{protocol}")
            try:
                await asyncio.wait_for(session.ready.wait(), STREAMS_SECONDS)
            except TimeoutError:  # the kubelet: "timed out waiting for client to create streams"
                pass
            if set(session.streams) != session.expected:  # timed out, or the client went first
                session.abort()
                return response
        else:
            return error(400, "BadRequest", "Upgrade request required")
        self.commands.append(options.command)
        await self._run(session, argv, options, view)
        return response

    async def _run(self, session: WebSocketSession | SpdySession, argv: list[str], options: ExecOptions,
                   cwd: Path) -> None:
        fault, limit = self.faults.next_exec()
        if fault == "stall":
            await session.stall()
            return
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=CHUNK,
                stdin=asyncio.subprocess.PIPE if options.stdin else asyncio.subprocess.DEVNULL)
        except OSError as exc:
            await session.finish({"metadata": {}, "status": "Failure", "message": f"exec failed: {exc}"})
            return
        sent = 0

        async def pump(stream: asyncio.StreamReader, name: str) -> None:
            nonlocal sent
            while chunk := await stream.read(CHUNK):
                if fault == "break" and name == "stdout":
                    chunk = chunk[:limit - sent]
                sent += len(chunk)
                if chunk and getattr(options, name):  # the command writes it; the client gets it if it asked
                    await session.send(name, chunk)
                if fault == "break" and sent >= limit:
                    raise ConnectionAbortedError

        async def feed() -> None:
            """The client's stdin into the command's, closed at its end (or when the command stops reading)."""
            assert proc.stdin is not None
            try:
                while (chunk := await session.stdin.get()) is not None:
                    proc.stdin.write(chunk)
                    await proc.stdin.drain()
            except ConnectionError:  # the command has exited or closed its stdin
                return
            finally:
                proc.stdin.close()
                session.stdin.discard()

        async def kill_when_gone() -> None:
            """A client that goes before the command ends takes it with it (the harness leaves nothing behind)."""
            await session.gone.wait()
            if proc.returncode is None:
                proc.kill()

        assert proc.stdout is not None and proc.stderr is not None
        helpers = [asyncio.ensure_future(kill_when_gone())] + ([asyncio.ensure_future(feed())] if options.stdin else [])
        try:
            await asyncio.gather(pump(proc.stdout, "stdout"), pump(proc.stderr, "stderr"))
            code = await proc.wait()
            await session.finish(exit_status(code))
        except ConnectionError:  # the injected break (no status, no close), or the client has gone
            session.abort()
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        finally:
            for helper in helpers:
                helper.cancel()
