"""Log lines for every ConvLens process (the API and the worker): JSON or text, one handler, no secrets.

`configure(fmt, secrets)` sets up the root logger once; the server calls it (service/server.py) and the Celery
worker too (worker/logs.py), so both write the same lines. `request_id_var` holds the id of the HTTP request being
served (service/logs.py sets it), stamped on every record written meanwhile.
"""

from __future__ import annotations

import contextvars
import io
import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("convlens_request_id", default=None)

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
                if isinstance(v, int | float | bool | type(None)):
                    out[k] = v
                else:  # a string or an object's repr may carry a credential as much as the message does
                    out[k] = redact(v if isinstance(v, str) else repr(v), self.secrets)
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


def resolve_format(fmt: str, stream: Any = None) -> str:
    """`auto` is text for a person (the stream is a terminal) and JSON for machines (containers, CI, files)."""
    if fmt != "auto":
        return fmt
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


def configure(
    fmt: str = "auto", secrets: Iterable[str] = (), level: int = logging.INFO, handler: logging.Handler | None = None
) -> logging.Handler:
    """Route every logger (uvicorn's too, when it gets log_config=None) through one handler (default: stderr);
    `fmt` json, text or auto (text on a terminal; a file handler is never one)."""
    stream = getattr(handler, "stream", None) if handler else sys.stderr
    fmt = resolve_format(fmt, stream if stream is not None else io.StringIO())
    handler = handler or logging.StreamHandler(sys.stderr)
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
