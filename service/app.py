"""The FastAPI app factory: settings, shared state, routers, error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from models.runs import RunStore
from service import errors
from service.routes import health, jobs, models, predict, visual
from service.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; tests pass their own Settings, the server reads the environment."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.store = RunStore(settings.home)
        yield

    app = FastAPI(
        title="ConvLens",
        version="0.1.0",
        summary="Train, serve and look inside a ResNet18 CIFAR classifier.",
        lifespan=lifespan,
    )
    errors.install(app)
    for module in (health, models, predict, visual, jobs):
        app.include_router(module.router)
    return app
