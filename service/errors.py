"""The one place where `models/` exceptions become HTTP statuses with a JSON `detail`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from models.errors import (
    BadImage,
    CheckpointError,
    ConvLensError,
    DatasetMissing,
    InvalidArgument,
    UnknownArchitecture,
    UnknownDataset,
    UnknownLayer,
)
from models.runs import RunNotFound

log = logging.getLogger("convlens.errors")

STATUS: list[tuple[type[ConvLensError], int]] = [
    (RunNotFound, 404),
    (BadImage, 422),
    (UnknownLayer, 422),
    (InvalidArgument, 422),
    (UnknownArchitecture, 422),
    (UnknownDataset, 422),
    (DatasetMissing, 503),  # the server lacks data; not the client's fault
    (CheckpointError, 503),
]


def status_for(exc: ConvLensError) -> int:
    """The HTTP status of a models/ exception (400 for any we did not list)."""
    return next((code for cls, code in STATUS if isinstance(exc, cls)), 400)


async def _convlens_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ConvLensError)
    code = status_for(exc)
    if code >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, code, exc)
    return JSONResponse({"detail": str(exc)}, status_code=code)


def install(app: FastAPI) -> None:
    """Register the handlers on an app."""
    app.add_exception_handler(ConvLensError, _convlens_error)
