"""Artifact uploads, streamed: a multipart/form-data body is parsed as it arrives (python-multipart's
streaming parser) and the file part goes straight to a partial file beside its destination, hashed on
the way, never spooled to a temporary file nor held whole in memory. The caps are checked on every
chunk: a file over a cap is refused as soon as it passes it and nothing of it is kept.

The parser runs on the event loop (it only slices bytes); the file writes run in worker threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import HTTPException
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

FILE_FIELD = "file"
TEXT_LIMITS = {"description": 64 * 1024, "path": 4096}  # bytes; a longer value is refused (413)
TEXT_FIELDS = tuple(TEXT_LIMITS)
FLUSH_BYTES = 1 << 20  # file bytes are written in batches of about this size

OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": [FILE_FIELD],
            "properties": {
                FILE_FIELD: {"type": "string", "format": "binary"},
                "description": {"type": "string", "maxLength": TEXT_LIMITS["description"]},
                "path": {"type": "string", "description": "where to keep it, relative (default: the file's name)"},
            },
        }}},
    }
}


@dataclass
class PartHead:
    name: str
    filename: str | None


Event = tuple[Literal["part"], PartHead] | tuple[Literal["data"], bytes] | tuple[Literal["end"], None]


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def multipart_boundary(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data Content-Type (HTTPException 422 if it is not one)."""
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise HTTPException(422, f"Content-Type={content_type!r}: expected multipart/form-data with a boundary")
    return boundary


class MultipartEvents:
    """python-multipart's push parser as a list of events per chunk: ("part", head), ("data", bytes),
    ("end", None). ``finished`` is set once the closing boundary was parsed."""

    def __init__(self, boundary: bytes) -> None:
        self.finished = False
        self._events: list[Event] = []
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}
        try:
            self._parser = MultipartParser(boundary, callbacks={
                "on_part_begin": self._headers.clear,
                "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": lambda data, start, end: self._events.append(("data", data[start:end])),
                "on_part_end": lambda: self._events.append(("end", None)),
                "on_end": self._end,
            })
        except Exception as exc:  # python-multipart refuses e.g. an over-long boundary
            raise HTTPException(422, f"Content-Type: bad multipart boundary ({exc})") from None

    def feed(self, chunk: bytes) -> list[Event]:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise HTTPException(400, f"body: not a valid multipart form ({exc})") from None
        events, self._events = self._events, []
        return events

    def _header_end(self) -> None:
        self._headers[_text(bytes(self._field)).strip().lower()] = _text(bytes(self._value)).strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        disposition = self._headers.get("content-disposition")
        kind, options = parse_options_header(disposition)
        if kind != b"form-data" or b"name" not in options:
            raise HTTPException(400, f"Content-Disposition={disposition!r}: expected form-data with a name")
        filename = options.get(b"filename")
        self._events.append(("part", PartHead(_text(options[b"name"]), _text(filename) if filename else None)))

    def _end(self) -> None:
        self.finished = True


class FileSink:
    """A partial file in ``directory`` (created here), hashed while written; moved into place at the end.
    Blocking: call its methods from a worker thread."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f".upload-{uuid.uuid4().hex}.partial"
        self.out = self.path.open("xb")
        self.digest = hashlib.sha256()

    def write(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.digest.update(chunk)
            self.out.write(chunk)

    def place(self, target: Path) -> None:
        self.out.close()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, target)

    def discard(self) -> None:
        try:
            self.out.close()
        finally:
            self.path.unlink(missing_ok=True)


@dataclass
class Upload:
    relative: str
    size: int
    sha256: str
    target: Path


@dataclass
class _State:
    sink: FileSink | None = None
    filename: str | None = None
    file_done: bool = False
    size: int = 0
    pending: list[bytes] = field(default_factory=list)
    pending_size: int = 0
    current: PartHead | None = None
    texts: dict[str, bytearray] = field(default_factory=dict)

    def text(self, name: str) -> str | None:
        raw = self.texts.get(name)
        return None if raw is None else _text(bytes(raw))


async def receive_upload(request: Request, *, root: Path, task_id: str, max_file_size: int, max_total_size: int,
                         already: int, safe_relative: Callable[[str], str]) -> Upload:
    """Stream the multipart body of ``request`` (fields ``file``, ``description``, ``path``) into
    ``root / <path or file name>``. ``already``: bytes the task has stored; ``safe_relative`` checks a
    path (raising HTTPException 422). Raises HTTPException 413 the moment a cap is passed, 400/422 for a
    malformed form; then nothing is kept."""
    events = MultipartEvents(multipart_boundary(request.headers.get("content-type")))
    state = _State()

    def shown_name() -> str:
        return state.text("path") or state.filename or "artifact"

    async def flush() -> None:
        if state.sink is not None and state.pending:
            chunks, state.pending, state.pending_size = state.pending, [], 0
            await _blocking(state.sink.write, chunks)

    async def handle(event: Event) -> None:
        head: PartHead | None
        if event[0] == "part":
            head = state.current = event[1]
            if head.name == FILE_FIELD:
                if state.sink is not None:
                    raise HTTPException(422, f"{FILE_FIELD}: only one file per upload")
                if (path := state.text("path")) is not None:
                    safe_relative(path)  # a bad path is refused before any byte of the file is written
                state.filename = head.filename
                state.sink = await _blocking(FileSink, root)
            elif head.name in TEXT_FIELDS:
                if head.name in state.texts:
                    raise HTTPException(422, f"{head.name}: given twice")
                state.texts[head.name] = bytearray()
        elif event[0] == "data":
            head = state.current
            data = event[1]
            if head is None:
                return
            if head.name == FILE_FIELD:
                state.size += len(data)
                if state.size > max_file_size:
                    raise HTTPException(413, f"artifact {shown_name()!r} is over the {max_file_size}-byte file cap")
                if already + state.size > max_total_size:
                    raise HTTPException(413, f"artifacts of task {task_id!r} are over the "
                                             f"{max_total_size}-byte total cap")
                state.pending.append(data)
                state.pending_size += len(data)
            elif head.name in TEXT_FIELDS:
                value = state.texts[head.name]
                value.extend(data)
                if len(value) > TEXT_LIMITS[head.name]:
                    raise HTTPException(413, f"{head.name}: over the {TEXT_LIMITS[head.name]}-byte limit")
            # any other field is ignored (and not kept)
        else:
            if state.current is not None and state.current.name == FILE_FIELD:
                state.file_done = True
            state.current = None

    try:
        try:
            async for chunk in request.stream():
                for event in events.feed(chunk):
                    await handle(event)
                if state.pending_size >= FLUSH_BYTES or state.file_done:
                    await flush()
        except ClientDisconnect:
            raise HTTPException(400, "body: the client went away before the upload ended") from None
        if not events.finished:
            raise HTTPException(400, "body: the multipart form ends before its closing boundary")
        if state.sink is None:
            raise HTTPException(422, f"{FILE_FIELD}: is required (a multipart file part)")
        await flush()
        relative = safe_relative(shown_name())
        target = root / relative
        try:
            await run_in_threadpool(state.sink.place, target)
        except OSError as exc:  # e.g. a directory of that name, or a file where a directory is needed
            raise HTTPException(409, f"path={relative!r}: cannot be stored there ({exc.strerror or exc})") from None
        return Upload(relative, state.size, state.sink.digest.hexdigest(), target)
    except BaseException:
        if state.sink is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                await run_in_threadpool(state.sink.discard)
        raise


async def _blocking(func: Callable[..., Any], *args: Any) -> Any:
    """Run blocking file I/O in a worker thread; a disk error is a one-line 507, not a traceback."""
    try:
        return await run_in_threadpool(func, *args)
    except OSError as exc:
        raise HTTPException(507, f"artifact could not be written ({exc.strerror or exc})") from None
