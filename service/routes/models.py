"""Routes: the models that can serve, and the choice of the default."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from models import render
from models.errors import ConvLensError
from models.resnet import STEMS, cam_layer
from service.auth import AUTH_401, WriteAccess
from service.deps import ModelIdPath, RegistryDep
from service.registry import ModelEntry, ModelRegistry
from service.schemas import ModelDetail, ModelList, ModelSummary

router = APIRouter(prefix="/models", tags=["models"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no model with that id"},
    422: {"description": "the id is not a valid model id"},
}


class PredictEngine(BaseModel):
    """What runs the model's /predict forward (service.engine), and the check it passed or failed at load."""

    engine: str = Field(description="openvino (compiled for the CPU) or torch (eager)", examples=["openvino"])
    precision: str | None = Field(None, description="f32, bf16 or int8", examples=["f32"])
    version: str | None = Field(None, description="the engine's version")
    threads: int | None = Field(None, description="the engine's CPU threads (CONVLENS_PREDICT_THREADS)")
    gate: dict[str, Any] | None = Field(
        None, description="logits vs torch on a probe batch, top-1 agreement and accuracy change on validation data"
    )
    fallback_reason: str | None = Field(None, description="why the engine (or a precision) was not used")


class ModelDetailWithEngine(ModelDetail):
    """ModelDetail plus what serves /predict."""

    predict_engine: PredictEngine | None = Field(None, description="what serves /predict; null until loaded")


def _default_or_none(registry: ModelRegistry) -> str | None:
    try:
        return registry.default_id()
    except ConvLensError:
        return None


def _summary(e: ModelEntry, default: str | None, loaded: list[str]) -> dict[str, object]:
    m = e.meta
    return {
        "id": e.id,
        "arch": str(m["arch"]),
        "dataset": m.get("dataset"),
        "num_classes": int(m["num_classes"]),
        "accuracy": e.accuracy,
        "epoch": m.get("epoch"),
        "created": datetime.fromtimestamp(e.created, UTC),
        "source": e.source,
        "default": e.id == default,
        "loaded": e.id in loaded,
    }


def _detail(e: ModelEntry, registry: ModelRegistry) -> ModelDetailWithEngine:
    m = e.meta
    n = int(m["num_classes"])
    classes = [str(c) for c in m.get("classes") or []]
    return ModelDetailWithEngine.model_validate(
        {
            **_summary(e, _default_or_none(registry), registry.loaded_ids()),
            "classes": classes if len(classes) == n else [str(i) for i in range(n)],
            "input_size": int(m.get("input_size", 32)),
            "cam_layer": cam_layer(STEMS.get(str(m.get("arch")), "imagenet"), int(m.get("input_size", 32))),
            "mean": m.get("mean", []),
            "std": m.get("std", []),
            "metrics": m.get("metrics") or {},
            "config": m.get("config") or {},
            "sha256": m.get("sha256"),
            "card": m.get("card"),
            "confusion": m.get("confusion"),
            "predict_engine": registry.engine_of(e.id),
        }
    )


@router.get("", response_model=ModelList, summary="List the models that can serve")
def list_models(registry: RegistryDep) -> ModelList:
    """Every finished run's best checkpoint (id = run id) and any registered or shipped model; rescans the store."""
    entries = registry.list_models()
    default, loaded = _default_or_none(registry), registry.loaded_ids()
    return ModelList(
        default=default, models=[ModelSummary.model_validate(_summary(e, default, loaded)) for e in entries]
    )


@router.get("/{model_id}", response_model=ModelDetailWithEngine, responses=NOT_FOUND, summary="One model's details")
def get_model(model_id: ModelIdPath, registry: RegistryDep) -> ModelDetailWithEngine:
    """Architecture, dataset, classes, normalisation, metrics and training config of one model."""
    return _detail(registry.entry(model_id), registry)


@router.post(
    "/{model_id}/default",
    response_model=ModelDetailWithEngine,
    responses={**NOT_FOUND, 401: AUTH_401, 503: {"description": "the checkpoint cannot be loaded"}},
    summary="Make a model the default",
    dependencies=[WriteAccess],
)
async def set_default(model_id: ModelIdPath, registry: RegistryDep) -> ModelDetailWithEngine:
    """Load the model, then record it in registry.json; requests already running finish on the old default."""
    entry = await run_in_threadpool(registry.set_default, model_id)
    return _detail(entry, registry)


@router.get(
    "/{model_id}/confusion.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **NOT_FOUND, 409: {"description": "no test confusion recorded"}},
    summary="The model's test-set confusion matrix as a picture",
)
def confusion_png(model_id: ModelIdPath, registry: RegistryDep) -> Response:
    """Rows: true class, columns: predicted; colour: the row's rate, numbers: counts (measured once, on test)."""
    e = registry.entry(model_id)
    conf = e.meta.get("confusion")
    if not conf:
        return JSONResponse(
            {"detail": f"model {e.id} has no recorded test confusion matrix (its run did not finish a test pass)"},
            status_code=409,
        )
    classes = [str(c) for c in e.meta.get("classes") or range(len(conf))]
    acc = e.accuracy
    title = f"{e.id}" + (f" - test accuracy {acc:.2%}" if acc is not None else "")
    return Response(render.confusion_png(conf, classes, title), media_type="image/png")
