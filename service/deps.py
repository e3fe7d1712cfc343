"""Typed dependencies, named once, so route signatures read like prose.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in its thread pool, which would cost
each request a thread hop per dependency for what is an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request

from models.runs import RunStore
from service.batching import Batcher
from service.grammar import MODEL_ID_PATTERN
from service.metrics import Metrics
from service.registry import ModelRegistry, validate_model_id
from service.settings import Settings


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_store(request: Request) -> RunStore:
    return request.app.state.store  # type: ignore[no-any-return]


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry  # type: ignore[no-any-return]


async def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher  # type: ignore[no-any-return]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


# The `model=` query parameter every model-backed endpoint takes (validated as an id by model_param, never a path).
ModelQuery = Annotated[
    str | None,
    Query(
        description="model id (GET /models); default: the registry's default model",
        examples=["seed-reproduction"],
        max_length=64,
        json_schema_extra={"pattern": MODEL_ID_PATTERN},  # checked by validate_model_id, with its message
    ),
]


async def model_param(model: ModelQuery = None) -> str | None:
    """The `model=` query parameter, validated as an id (never a path)."""
    return None if model is None else validate_model_id(model)


ModelIdPath = Annotated[
    str,
    Path(
        max_length=64,
        description="a model id (GET /models): 1-64 letters, digits, '-' or '_', starting with a letter or digit",
        json_schema_extra={"pattern": MODEL_ID_PATTERN},
    ),
]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[RunStore, Depends(get_store)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ModelParam = Annotated[str | None, Depends(model_param)]
