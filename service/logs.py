"""Structured logs: one JSON object per line, a request id per request (echoed as X-Request-ID), no secrets.

`configure(fmt, secrets)` sets up the root logger once (the server calls it); `RequestIdMiddleware` takes a sane
incoming `X-Request-ID` or makes one, puts it in every log record written while the request runs, echoes it in
the response and logs one access line (method, path, status, duration) per request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
# An incoming id is kept only if it is short and plain: it goes into logs and a response header verbatim.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("convlens_request_id", default=None)
access_log = logging.getLogger("convlens.access")

# Credentials that could reach a message (a logged header dump, an exception text, a URL with a password).
_SECRET_PATTERNS = [
    re.compile(
        r"(?i)((?:authorization|x-api-key|api[_-]key|password|token)['\"]?\s*[:=]\s*['\"]?(?:bearer\s+|basic\s+)?)"
        r"(?:\[[^\]]*\]|[^\s'\",}\]]+)"
    ),
    re.compile(r"(?i)(://[^:/@\s]*:)[^@\s]+(?=@)"),  # scheme://user:password@host
]
# Attributes every LogRecord has; anything else was passed in `extra=` and becomes a JSON field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with the configured secrets and anything shaped like a credential replaced by ***."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    for pat in _SECRET_PATTERNS:
        text = pat.sub(lambda m: m.group(1) + "***", text)
    return text


class RedactFilter(logging.Filter):
    """Scrubs secrets from the formatted message (and exception text) of every record it sees."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg, self.secrets)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being served (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, extra fields, exc."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage(), self.secrets),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD and k not in out:
                out[k] = v if isinstance(v, str | int | float | bool | type(None)) else repr(v)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info), self.secrets)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with the request id when there is one, and secrets scrubbed."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")
        self.secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None) or request_id_var.get()
        record.rid = f" [{rid}]" if rid else ""
        return redact(super().format(record), self.secrets)


def configure(fmt: str = "json", secrets: Iterable[str] = (), level: int = logging.INFO) -> logging.Handler:
    """Route every logger (uvicorn's too, when it gets log_config=None) through one stderr handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else TextFormatter(secrets))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_convlens", False):
            root.removeHandler(h)
    handler._convlens = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    return handler


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
