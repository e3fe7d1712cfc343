"""Structured logs of the API: one JSON object per line (models/logs.py), a request id per request, no secrets.

`RequestIdMiddleware` takes a sane incoming `X-Request-ID` or makes one, puts it in every log record written while
the request runs, echoes it in the response and logs one access line (method, path, status, duration) per request.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.logs import request_id_var

REQUEST_ID_HEADER = "X-Request-ID"
# An incoming id is kept only if it is short and plain: it goes into logs and a response header verbatim.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_log = logging.getLogger("convlens.access")


def incoming_request_id(scope: Scope) -> str | None:
    """The client's X-Request-ID if it is sane (bounded, plain characters), else None."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if REQUEST_ID_RE.fullmatch(text) else None
    return None


class RequestIdMiddleware:
    """Pure ASGI (streams such as SSE pass through untouched): request id in, header out, one access line."""

    def __init__(self, app: ASGIApp, log_requests: bool = True) -> None:
        self.app, self.log_requests = app, log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = incoming_request_id(scope) or uuid.uuid4().hex
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.log_requests:
                path = str(scope.get("path", ""))[:1024]
                access_log.info(
                    "%s %s %d",
                    scope.get("method", ""),
                    path.encode("unicode_escape").decode("ascii"),  # a %0A in the path forges no log line
                    status[0],
                    extra={
                        "method": scope.get("method", ""),
                        "path": path,
                        "status": status[0],
                        "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                        "client": (scope.get("client") or ("", 0))[0],
                    },
                )
            request_id_var.reset(token)
