"""Routes: POST /predict, classification of one or many images through the micro-batcher."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from models.errors import InvalidArgument
from service.batching import Batcher
from service.deps import ModelQuery
from service.images import ImageLimits, Upload, image_request_body, prepare_uint8, read_uploads
from service.registry import LoadedModel, ModelRegistry, validate_model_id
from service.schemas import PredictJSON, PredictResponse
from service.settings import Settings

router = APIRouter(prefix="/predict", tags=["predict"])

# Below this many bytes decoding takes well under a millisecond: do it on the event loop, skipping a thread hop.
INLINE_DECODE_BYTES = 64 * 1024

REQUEST_BODY = image_request_body("files", True, PredictJSON.model_json_schema())

RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"description": "body over max_upload_bytes, an image over max_image_pixels, or too many images"},
    415: {"description": "neither multipart/form-data nor application/json"},
    422: {"description": "empty, truncated or non-image bytes, bad base64, top_k out of range, bad model id"},
    404: {"description": "no model with that id"},
    503: {"description": "no model trained yet (the detail says how to train one), or the queue is full"},
}


def _tensors(uploads: list[Upload], loaded: LoadedModel, limits: ImageLimits) -> torch.Tensor:
    names = [f"image {i}" + (f" ({u.filename!r})" if u.filename else "") for i, u in enumerate(uploads)]
    xs = [prepare_uint8(u.data, loaded.meta, limits, n) for u, n in zip(uploads, names, strict=True)]
    return xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)


def top_k_scores(probs: torch.Tensor, k: int, classes: list[str]) -> list[list[dict[str, Any]]]:
    """Per row: the k largest probabilities as {name, index, probability}, most probable first."""
    values, indices = probs.topk(k, dim=1)
    return [
        [{"name": classes[i], "index": i, "probability": p} for p, i in zip(vs, ix, strict=True)]
        for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)
    ]


@router.post("", response_model=PredictResponse, responses=RESPONSES, openapi_extra=REQUEST_BODY, summary="Classify")
async def predict(
    request: Request,
    model: ModelQuery = None,
    top_k: Annotated[int, Query(ge=1, le=1000, description="classes per image (at most the model's classes)")] = 5,
) -> JSONResponse:
    """Top-k classes of each image (multipart field `files`, or JSON base64 `images`), micro-batched."""
    # The hot path of the service: it reads app.state itself instead of through service.deps, and answers with
    # the JSON it builds instead of a model FastAPI validates again, because under load the event loop is what
    # limits /predict and FastAPI's dependency solving and response validation cost it more than the handler's
    # own work (bench/serve_predict.py prints the event loop's CPU a request). The answer's shape is tested
    # against PredictResponse.
    state = request.app.state
    registry: ModelRegistry = state.registry
    batcher: Batcher = state.batcher
    settings: Settings = state.settings
    loaded = await registry.aget(None if model is None else validate_model_id(model))
    k_max = min(loaded.num_classes, settings.max_top_k)
    if top_k > k_max:
        raise InvalidArgument(f"top_k={top_k} is too large: model {loaded.id} allows at most {k_max}")
    uploads = await read_uploads(request, settings.max_upload_bytes, settings.max_images_per_request)
    limits = ImageLimits(settings.max_upload_bytes, settings.max_image_pixels)
    if sum(len(u.data) for u in uploads) <= INLINE_DECODE_BYTES:
        x = _tensors(uploads, loaded, limits)
    else:
        x = await run_in_threadpool(_tensors, uploads, loaded, limits)
    probs = await batcher.predict(loaded, x)
    scores = top_k_scores(probs, top_k, loaded.classes)
    predictions = [
        {"image": i, "filename": u.filename, "top_k": s} for i, (u, s) in enumerate(zip(uploads, scores, strict=True))
    ]
    return JSONResponse({"model": loaded.id, "predictions": predictions})
