"""The one place where `models/` exceptions become HTTP statuses with a JSON `detail`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from models.errors import (
    BadImage,
    CheckpointError,
    ConvLensError,
    DatasetMissing,
    DiskFull,
    InvalidArgument,
    NoSuchChannel,
    UnknownArchitecture,
    UnknownDataset,
    UnknownLayer,
)
from models.runs import RunNotFound

log = logging.getLogger("convlens.errors")


class PayloadTooLarge(BadImage):
    """An upload over the byte, pixel or image-count limits."""


class UnsupportedMediaType(BadImage):
    """A request body in a content type the endpoint does not read."""


class ModelNotFound(ConvLensError, LookupError):
    """No model with that id in the registry."""


class NoModel(ConvLensError):
    """No model can serve at all: nothing trained or shipped yet."""


class Overloaded(ConvLensError):
    """The inference queue is full; the client should retry shortly."""


# First match wins, so subclasses come before their bases.
STATUS: list[tuple[type[ConvLensError], int]] = [
    (RunNotFound, 404),
    (ModelNotFound, 404),
    (NoSuchChannel, 404),  # a well-formed index the model at hand does not have (the schema cannot know widths)
    (PayloadTooLarge, 413),
    (UnsupportedMediaType, 415),
    (BadImage, 422),
    (UnknownLayer, 422),
    (InvalidArgument, 422),
    (UnknownArchitecture, 422),
    (UnknownDataset, 422),
    (DatasetMissing, 503),  # the server lacks data; not the client's fault
    (CheckpointError, 503),
    (DiskFull, 507),  # the run store is full: nothing was written, the request can be retried later
    (NoModel, 503),
    (Overloaded, 503),
]

# Statuses a client may retry after a pause; the header says how long.
RETRY_AFTER_S = {Overloaded: 1}


def status_for(exc: ConvLensError) -> int:
    """The HTTP status of a models/ exception (400 for any we did not list)."""
    return next((code for cls, code in STATUS if isinstance(exc, cls)), 400)


async def _convlens_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ConvLensError)
    code = status_for(exc)
    if code >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, code, exc)
    retry = next((s for cls, s in RETRY_AFTER_S.items() if isinstance(exc, cls)), None)
    headers = {"Retry-After": str(retry)} if retry else None
    return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)


METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (asked of the router the way it routes a request)."""
    routes = request.app.router.routes
    return [m for m in METHODS if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)]


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        # Starlette's answer lists only the first route that matched the path, not every route on it.
        allow = ", ".join(allowed_methods(request))
        return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": allow})
    return await http_exception_handler(request, exc)


def install(app: FastAPI) -> None:
    """Register the handlers on an app."""
    app.add_exception_handler(ConvLensError, _convlens_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
