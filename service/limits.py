"""Bounds every request has, before any route reads it: URL length (414) and body bytes (413), JSON `detail`.

The image routes stream their uploads against the same byte limit with their own messages; this middleware is
the floor under every other route (a `POST /train` body, a JSON base64 upload without Content-Length). Pure ASGI,
so event streams pass through untouched. A 422 never echoes more than a short prefix of what the client sent.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ECHO_CHARS = 200  # of a rejected input, in a 422
RESPONSES: dict[int | str, dict[str, Any]] = {
    414: {"description": "the path and query string are longer than CONVLENS_MAX_URL_BYTES"}
}


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestLimitsMiddleware:
    """414 for a path + query over `max_url_bytes`; 413 for a body over `max_body_bytes` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_url_bytes: int) -> None:
        self.app, self.max_body, self.max_url = app, max_body_bytes, max_url_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b""))
        if url > self.max_url:
            detail = f"the URL is {url:,} bytes; the limit is {self.max_url:,} (CONVLENS_MAX_URL_BYTES)"
            await _send_json(send, 414, detail)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _send_json(send, 413, self._too_big(int(declared)))
            return
        seen, over, started = 0, False, False

        async def counted_receive() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # a body without (or lying about) Content-Length: stop reading it
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if over:  # whatever the route made of the cut-off body (FastAPI: 400 "error parsing the body") -> 413
                if not started:
                    started = True
                    await _send_json(send, 413, self._too_big(seen, at_least=True))
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except ClientDisconnect:
            if not over:
                raise
        if over:  # the route gave up without answering: answer for it
            await tracked_send({"type": "http.response.start"})

    def _too_big(self, size: int, at_least: bool = False) -> str:
        return (
            f"the request body is {'over ' if at_least else ''}{size:,} bytes; the limit is {self.max_body:,} "
            "(CONVLENS_MAX_UPLOAD_BYTES)"
        )


def _short(value: Any) -> Any:
    if isinstance(value, str | bytes) and len(value) > ECHO_CHARS:
        return f"{value[:ECHO_CHARS]!s}... ({len(value):,} long)"
    if isinstance(value, dict | list) and len(json.dumps(jsonable_encoder(value), default=str)) > ECHO_CHARS:
        return f"({type(value).__name__} of {len(value)} entries, not echoed)"
    return value


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body, with each rejected `input` cut to a short prefix: a 10 MB field is not sent back."""
    assert isinstance(exc, RequestValidationError)
    errors = [{**e, "input": _short(e["input"])} if "input" in e else e for e in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def install(app: FastAPI, max_body_bytes: int, max_url_bytes: int) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(RequestLimitsMiddleware, max_body_bytes=max_body_bytes, max_url_bytes=max_url_bytes)
