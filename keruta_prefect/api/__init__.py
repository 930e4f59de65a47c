"""The keruta API: the HTTP contract keruta-agent speaks, plus task create/list.

`create_app(store, token)` builds the FastAPI app; `ApiServer` runs it in a background thread on
loopback (the local backend embeds one); `keruta-prefect api` runs it in the foreground.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import anyio
import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import AfterValidator, BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Scope

from keruta_prefect.api import uploads
from keruta_prefect.api.guard import Guard
from keruta_prefect.logfeed import FEED
from keruta_prefect.models import (
    ArtifactInfo,
    InvalidTransition,
    Task,
    TaskSpecError,
    TaskStatus,
    Usage,
    parse_task_spec,
)
from keruta_prefect.store import LogLine, Store, TaskExists, TaskNotFound
from keruta_prefect.validation import one_line

MAX_LOG_MESSAGE = 64 * 1024
MAX_LOG_BATCH = 5000
MAX_BODY = 16 * 2**20  # JSON bodies; artifact uploads are capped by the artifact settings instead
_UPLOAD_PATH = re.compile(r"^/api/v1/tasks/[^/]+/artifacts$")
log = logging.getLogger("keruta.api")


# Text a database can keep: PostgreSQL refuses NUL in text (a 500 on every retry, which an agent would read
# as an unreachable API), so a NUL is kept as U+FFFD, as the agent does with undecodable bytes.
StoredText = Annotated[str, AfterValidator(lambda value: value.replace("\x00", "\ufffd"))]


class StatusUpdate(BaseModel):
    status: TaskStatus
    message: StoredText | None = Field(None, max_length=65536)
    progress: int | None = Field(None, ge=0, le=100)
    errorCode: StoredText | None = Field(None, max_length=128)
    # What the script used (models.Usage), with the final status. Taken as it comes and checked apart
    # (usage_of): a bad one is ignored and logged, never a reason to refuse the final status.
    usage: Any = None


def usage_of(task_id: str, value: Any) -> dict[str, Any] | None:
    """The usage of a status report as it is stored (camelCase, only what was measured); None when there
    is none, or it is not a usage (logged: the report itself stands)."""
    if value is None:
        return None
    try:
        usage = Usage.model_validate(value)
    except ValidationError as exc:
        shown = repr(value) if len(repr(value)) <= 120 else repr(value)[:115] + "…"
        log.warning("task %s: usage=%s ignored: %s", task_id, shown, one_line(exc))
        return None
    return usage.model_dump(mode="json", by_alias=True, exclude_none=True) or None


class LogIn(BaseModel):
    level: str = Field("INFO", max_length=16)
    message: StoredText = Field(max_length=MAX_LOG_MESSAGE)
    seq: int | None = Field(None, ge=0, le=2**31 - 1)  # a database INTEGER
    ts: float | None = Field(None, ge=0, le=253402300799, allow_inf_nan=False)  # seconds, up to the year 9999


class LogBatch(BaseModel):
    source: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    lines: list[LogIn] = Field(max_length=MAX_LOG_BATCH)


LEVELS = {"DEBUG", "INFO", "WARN", "WARNING", "ERROR", "CRITICAL"}
_SAFE_PART = re.compile(r"^[A-Za-z0-9._ +@=,-]+$")


def _task_json(task: Task) -> dict[str, Any]:
    return task.model_dump(mode="json", by_alias=True)


def create_app(
    store: Store,
    token: str,
    *,
    artifacts_root: Path | None = None,
    max_file_size: int = 100 * 2**20,
    max_total_size: int = 2**30,
) -> FastAPI:
    """The keruta API. Every route but the health check and the docs needs ``Authorization: Bearer
    <token>``, checked (with the body-size limits) by :class:`Guard` before any body byte is read.
    Blocking work (the store, file writes, parsing a large body) runs in worker threads, never on the
    event loop."""
    if not token:
        raise ValueError("the keruta API needs a token (KERUTA_API_TOKEN or the keruta-api block)")
    app = FastAPI(title="keruta API", version="1", docs_url="/api/docs", openapi_url="/api/openapi.json")
    public = {"/api/v1/health", app.docs_url, app.openapi_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}

    def body_limit(scope: Scope) -> int:
        is_upload = scope["method"] == "POST" and _UPLOAD_PATH.match(scope["path"]) is not None
        return max_file_size + 2**20 if is_upload else MAX_BODY  # an upload: its file plus the form around it

    app.add_middleware(Guard, token=token.encode(), public={p for p in public if p}, limit_for=body_limit)
    # Documents the scheme in the OpenAPI (the docs' "Authorize" button); Guard does the checking.
    auth = [Security(HTTPBearer(auto_error=False, description="the keruta API token"))]
    upload_locks: weakref.WeakValueDictionary[str, anyio.Lock] = weakref.WeakValueDictionary()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
            field = ".".join(loc) or "body"
            value = err.get("input")
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:55] + "…"
            parts.append(f"{field}={shown}: {err.get('msg')}")
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(TaskNotFound)
    async def _not_found(_request: Request, exc: TaskNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(InvalidTransition)
    async def _conflict(_request: Request, exc: InvalidTransition) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(RecursionError)
    async def _too_deep(_request: Request, _exc: RecursionError) -> JSONResponse:
        return JSONResponse({"detail": "body is not valid JSON (nested too deeply)"}, status_code=400)

    @app.get("/api/v1/health")
    async def health() -> dict[str, str]:  # on the event loop: answers even when every worker thread is busy
        return {"status": "ok"}

    @app.post("/api/v1/tasks", status_code=201, dependencies=auth)
    async def create_task(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(_create_task, await request.body())

    def _create_task(body: bytes) -> dict[str, Any]:
        try:
            task = parse_task_spec(body, source="task")
        except TaskSpecError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            return _task_json(store.create_task(task))
        except TaskExists as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get("/api/v1/tasks", dependencies=auth)
    def list_tasks(status: TaskStatus | None = None, limit: int = 100,
                   offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0) -> list[dict[str, Any]]:
        limit = max(1, min(limit, 1000))
        return [_task_json(t) for t in store.list_tasks(status, limit=limit, offset=max(0, offset))]

    @app.get("/api/v1/tasks/{task_id}", dependencies=auth)
    def get_task(task_id: str) -> dict[str, Any]:
        return _task_json(store.get_task(task_id))

    @app.get("/api/v1/tasks/{task_id}/script", dependencies=auth)
    def get_script(task_id: str) -> dict[str, Any]:
        task = store.get_task(task_id)
        if task.script is None:
            raise HTTPException(404, f"task {task_id!r} has no script")
        script = task.script.model_dump(by_alias=True)
        script["content"] = task.script.runnable()
        return {"success": True, "taskId": task.id, "script": script}

    @app.put("/api/v1/tasks/{task_id}/status", dependencies=auth)
    def put_status(task_id: str, update: StatusUpdate) -> dict[str, Any]:
        task = store.set_status(
            task_id, update.status, message=update.message, progress=update.progress, error_code=update.errorCode,
            usage=usage_of(task_id, update.usage),
        )
        return _task_json(task)

    @app.post("/api/v1/tasks/{task_id}/logs", dependencies=auth)
    async def post_logs(task_id: str, request: Request) -> dict[str, Any]:
        return await run_in_threadpool(_store_logs, task_id, await request.body())

    def _store_logs(task_id: str, body: bytes) -> dict[str, Any]:
        try:
            raw = json.loads(body)
        except ValueError:
            raise HTTPException(400, "body is not valid JSON") from None
        except RecursionError:
            raise HTTPException(400, "body is not valid JSON (nested too deeply)") from None
        try:
            if isinstance(raw, dict) and "lines" in raw:
                batch = LogBatch.model_validate(raw)
            elif isinstance(raw, list):
                batch = LogBatch(lines=[LogIn.model_validate(item) for item in raw[: MAX_LOG_BATCH + 1]])
            else:
                batch = LogBatch(lines=[LogIn.model_validate(raw)])
        except ValidationError as exc:
            status = 413 if any(e["type"] in ("string_too_long", "too_long") for e in exc.errors()) else 422
            raise HTTPException(status, one_line(exc)) from None
        # Lines without a sequence number (the original single-line form) get a source of their own,
        # so they are always stored; sequenced lines are stored exactly once per (source, seq).
        source = batch.source or f"api-{uuid.uuid4().hex[:12]}"
        lines = []
        for index, line in enumerate(batch.lines):
            level = line.level.upper()
            if level not in LEVELS:
                raise HTTPException(422, f"level={line.level!r}: allowed: {', '.join(sorted(LEVELS))}")
            ts = datetime.fromtimestamp(line.ts, UTC) if line.ts is not None else None
            lines.append(LogLine(seq=line.seq if line.seq is not None else index, level=level,
                                 message=line.message, ts=ts))
        stored = store.store_logs(task_id, source, lines)
        FEED.publish(store.database, task_id, stored)  # a flow waiting on the task here gets them at once
        return {"success": True, "received": len(lines), "stored": len(stored)}

    @app.post("/api/v1/tasks/{task_id}/artifacts", dependencies=auth, openapi_extra=uploads.OPENAPI)
    async def post_artifact(task_id: str, request: Request) -> dict[str, Any]:
        """multipart/form-data: ``file``, optional ``description`` and ``path`` (default: the file's name).
        Streamed into place (see keruta_prefect.api.uploads); refused with 413 the moment a cap is passed."""
        await run_in_threadpool(store.get_task, task_id)  # 404 before any byte of the body is read
        root = (artifacts_root or Path.cwd()) / _safe_relative(task_id) / "uploads"
        # One upload of a task at a time (in this process), so two cannot both pass the total cap.
        lock = upload_locks.get(task_id)
        if lock is None:
            lock = upload_locks[task_id] = anyio.Lock()
        async with lock:
            already = await run_in_threadpool(lambda: sum(a.size for a in store.artifacts(task_id)))
            upload = await uploads.receive_upload(
                request, root=root, task_id=task_id, max_file_size=max_file_size, max_total_size=max_total_size,
                already=already, safe_relative=_safe_relative)
            info = ArtifactInfo(path=upload.relative, size=upload.size, sha256=upload.sha256,
                                location=str(upload.target))
            await run_in_threadpool(store.add_artifacts, task_id, None, [info])
        return {"success": True, "path": upload.relative, "size": upload.size, "sha256": upload.sha256}

    return app


def _safe_relative(path: str) -> str:
    """A relative path with no '..', no absolute part and no odd characters in any component."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p == ".." or not _SAFE_PART.match(p) for p in parts) or path.startswith("/"):
        raise HTTPException(422, f"path={path!r}: must be a relative path without '..'")
    return "/".join(parts)


class ApiServer:
    """The keruta API in a background thread (uvicorn), on 127.0.0.1 and a free port by default."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> None:
        # log_config=None: uvicorn must not reconfigure logging (dictConfig closes every existing handler,
        # Prefect's API log handler included, which stalls the run for seconds and loses its logs).
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="keruta-api", daemon=True)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the keruta API did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
