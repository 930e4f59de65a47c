"""The gate in front of the keruta API (a pure ASGI middleware): the token is checked and the body size
is capped before any route runs, so no request body is read (parsed, spooled, stored) for a caller
without the token, and none is read past its limit whether or not it declared a Content-Length.

A response sent before the request's body was read to the end carries ``Connection: close``: the
server then drops the connection instead of reading (and discarding) the rest of a huge body.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Collection
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNAUTHORIZED = "missing or wrong token (Authorization: Bearer <token>)"


class BodyTooLarge(HTTPException):
    """A request body past its limit (raised while it streams in, from the ASGI ``receive``)."""

    def __init__(self, limit: int, received: int) -> None:
        super().__init__(413, f"request body of at least {received} bytes is over the {limit}-byte limit")


def bearer_ok(authorization: str | None, expected: bytes) -> bool:
    """Whether ``Authorization`` is ``Bearer <expected>``; constant-time whatever prefix matches."""
    given = b""
    if authorization and authorization.startswith("Bearer "):
        given = authorization[7:].strip().encode()
    return hmac.compare_digest(given, expected)


def declared_length(headers: dict[bytes, bytes]) -> int | None:
    """The Content-Length a request declares (None: none, or not a number)."""
    raw = headers.get(b"content-length", b"").strip()
    return int(raw) if raw.isdigit() else None


def has_body(headers: dict[bytes, bytes]) -> bool:
    return bool(declared_length(headers)) or b"transfer-encoding" in headers


class Guard:
    """Token first, then a body limit enforced as the body streams in (``limit_for(scope)`` bytes).

    ``public`` holds the paths anyone may GET (health, API docs); every other request needs the token.
    """

    def __init__(self, app: ASGIApp, *, token: bytes, public: Collection[str],
                 limit_for: Callable[[Scope], int]) -> None:
        self.app = app
        self.token = token
        self.public = frozenset(public)
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        headers = {key.lower(): value for key, value in scope["headers"]}
        authorized = bearer_ok(headers.get(b"authorization", b"").decode("latin-1") or None, self.token)
        if scope["type"] == "websocket":  # none is served; any added later needs the token as well
            if authorized:
                await self.app(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
        body_pending = has_body(headers)
        is_public = scope["method"] in ("GET", "HEAD") and scope["path"] in self.public
        if not is_public and not authorized:
            await _answer(send, 401, UNAUTHORIZED, close=body_pending, extra=[(b"www-authenticate", b"Bearer")])
            return
        limit = self.limit_for(scope)
        length = declared_length(headers)
        if length is not None and length > limit:
            await _answer(send, 413, f"request body of {length} bytes is over the {limit}-byte limit",
                          close=True)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received, body_pending
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    body_pending = False
                if received > limit:
                    raise BodyTooLarge(limit, received)
            elif message["type"] == "http.disconnect":
                body_pending = False
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and body_pending:
                # Answered before the body was read to its end: close rather than drain the rest.
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited_receive, closing_send)


async def _answer(send: Send, status: int, detail: str, *, close: bool,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode()), *(extra or [])]
    if close:
        headers.append((b"connection", b"close"))
    start: dict[str, Any] = {"type": "http.response.start", "status": status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})
