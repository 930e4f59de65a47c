"""The keruta API: the HTTP contract keruta-agent speaks, plus task create/list.

`create_app(store, token)` builds the FastAPI app; `ApiServer` runs it in a background thread on
loopback (the local backend embeds one); `keruta-prefect api` runs it in the foreground.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from keruta_prefect.models import (
    ArtifactInfo,
    InvalidTransition,
    TaskSpecError,
    TaskStatus,
    parse_task_spec,
)
from keruta_prefect.store import LogLine, Store, TaskExists, TaskNotFound
from keruta_prefect.validation import one_line

MAX_LOG_MESSAGE = 64 * 1024
MAX_LOG_BATCH = 5000
MAX_BODY = 16 * 2**20  # JSON bodies; artifact uploads are capped by the artifact settings instead


class StatusUpdate(BaseModel):
    status: TaskStatus
    message: str | None = Field(None, max_length=65536)
    progress: int | None = Field(None, ge=0, le=100)
    errorCode: str | None = Field(None, max_length=128)


class LogIn(BaseModel):
    level: str = Field("INFO", max_length=16)
    message: str = Field(max_length=MAX_LOG_MESSAGE)
    seq: int | None = Field(None, ge=0)
    ts: float | None = None


class LogBatch(BaseModel):
    source: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    lines: list[LogIn] = Field(max_length=MAX_LOG_BATCH)


LEVELS = {"DEBUG", "INFO", "WARN", "WARNING", "ERROR", "CRITICAL"}
_SAFE_PART = re.compile(r"^[A-Za-z0-9._ +@=,-]+$")


def _task_json(task: Any) -> dict[str, Any]:
    return task.model_dump(mode="json", by_alias=True)


def create_app(
    store: Store,
    token: str,
    *,
    artifacts_root: Path | None = None,
    max_file_size: int = 100 * 2**20,
    max_total_size: int = 2**30,
) -> FastAPI:
    if not token:
        raise ValueError("the keruta API needs a token (KERUTA_API_TOKEN or the keruta-api block)")
    app = FastAPI(title="keruta API", version="1", docs_url="/api/docs", openapi_url="/api/openapi.json")
    expected = token.encode()

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        given = b""
        if authorization and authorization.startswith("Bearer "):
            given = authorization[7:].strip().encode()
        # Constant-time: the comparison takes as long whatever prefix matches.
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "missing or wrong token (Authorization: Bearer <token>)")

    auth = [Depends(require_token)]

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

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        is_upload = request.url.path.endswith("/artifacts")
        limit = max_file_size + 2**20 if is_upload else MAX_BODY
        if length and length.isdigit() and int(length) > limit:
            return JSONResponse({"detail": f"request body of {length} bytes is over the {limit}-byte limit"}, 413)
        return await call_next(request)

    @app.get("/api/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/v1/tasks", status_code=201, dependencies=auth)
    async def create_task(request: Request) -> dict[str, Any]:
        body = await request.body()
        try:
            task = parse_task_spec(body, source="task")
        except TaskSpecError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            return _task_json(store.create_task(task))
        except TaskExists as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get("/api/v1/tasks", dependencies=auth)
    def list_tasks(status: TaskStatus | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
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
            task_id, update.status, message=update.message, progress=update.progress, error_code=update.errorCode
        )
        return _task_json(task)

    @app.post("/api/v1/tasks/{task_id}/logs", dependencies=auth)
    async def post_logs(task_id: str, request: Request) -> dict[str, Any]:
        try:
            raw = await request.json()
        except ValueError:
            raise HTTPException(400, "body is not valid JSON") from None
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
        stored = store.add_logs(task_id, source, lines)
        return {"success": True, "received": len(lines), "stored": stored}

    @app.post("/api/v1/tasks/{task_id}/artifacts", dependencies=auth)
    async def post_artifact(
        task_id: str,
        file: Annotated[UploadFile, File()],
        description: Annotated[str | None, Form()] = None,
        path: Annotated[str | None, Form()] = None,
    ) -> dict[str, Any]:
        store.get_task(task_id)
        relative = _safe_relative(path or file.filename or "artifact")
        root = (artifacts_root or Path.cwd()) / _safe_relative(task_id) / "uploads"
        target = root / relative
        already = sum(a.size for a in store.artifacts(task_id))
        digest = hashlib.sha256()
        size = 0
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        try:
            with partial.open("wb") as out:
                while chunk := await file.read(1 << 20):
                    size += len(chunk)
                    if size > max_file_size:
                        raise HTTPException(413, f"artifact {relative!r} is over the {max_file_size}-byte file cap")
                    if already + size > max_total_size:
                        raise HTTPException(413, f"artifacts of task {task_id!r} are over the "
                                                 f"{max_total_size}-byte total cap")
                    digest.update(chunk)
                    out.write(chunk)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        info = ArtifactInfo(path=relative, size=size, sha256=digest.hexdigest(), location=str(target))
        store.add_artifacts(task_id, None, [info])
        return {"success": True, "path": relative, "size": size, "sha256": info.sha256}

    return app


def _safe_relative(path: str) -> str:
    """A relative path with no '..', no absolute part and no odd characters in any component."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p == ".." or not _SAFE_PART.match(p) for p in parts) or path.startswith("/"):
        raise HTTPException(422, f"path={path!r}: must be a relative path without '..'")
    return "/".join(parts)


class ApiServer:
    """The keruta API in a background thread (uvicorn), on 127.0.0.1 and a free port by default."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
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
