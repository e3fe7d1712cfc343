"""The FastAPI app factory: settings, shared state (registry, batcher, metrics), routers, error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from models.errors import ConvLensError
from models.runs import RunStore
from models.shipped import SHIPPED_DIR, SHIPPED_ID
from service import auth, errors, limits
from service.batching import Batcher
from service.engine import engine_config
from service.jobs_sse import StreamLimiter
from service.logs import RequestIdMiddleware
from service.metrics import Metrics, MetricsMiddleware
from service.registry import ModelRegistry, checkpoint_dir_source
from service.routes import atlas as atlas_routes
from service.routes import compare, explain, health, jobs, models, predict, sweeps, timelapse, ui, visual, visualize
from service.settings import Settings, get_settings

log = logging.getLogger("convlens.app")


def default_torch_threads(processes: int = 1) -> int:
    """The cores left once each API process's event loop (HTTP, decoding) has one, shared out; at least one."""
    return max(1, (len(os.sched_getaffinity(0)) - processes) // processes)


@contextlib.contextmanager
def drain_on_signals(loop: asyncio.AbstractEventLoop, draining: asyncio.Event) -> Iterator[None]:
    """SIGTERM/SIGINT end open event streams at once, then reach the server's own handler (uvicorn's graceful
    shutdown), so a stream never holds a shutdown, under `convlens serve`, its API processes or bare uvicorn.
    Only where signals can be handled (the main thread); elsewhere (test clients) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(sig: int, frame: types.FrameType | None) -> None:
        loop.call_soon_threadsafe(draining.set)
        chained = previous[sig]
        if callable(chained):
            chained(sig, frame)
        elif chained == signal.SIG_DFL:  # nobody else listens: behave as if we were not here
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            if signal.getsignal(sig) is handler:  # leave alone a handler someone installed after ours
                signal.signal(sig, h)


def build_registry(
    settings: Settings, store: RunStore, batcher: Batcher, metrics: Metrics | None = None
) -> ModelRegistry:
    """The registry over the run store, registry.json and any shipped model folders; models warmed for `batcher`."""
    dirs = [*settings.model_dirs, *([SHIPPED_DIR] if settings.shipped_models else [])]
    default = settings.default_model or (SHIPPED_ID if settings.shipped_models else None)
    return ModelRegistry(
        store,
        extra_sources=[("shipped", checkpoint_dir_source(d)) for d in dirs],
        cache_size=settings.model_cache_size,
        device=settings.device,
        default_model=default,
        on_load=metrics.observe_load if metrics else None,
        engine=engine_config(settings),
        warm_sizes=batcher.warm_sizes,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; tests pass their own Settings, the server reads the environment."""
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        auth.warn_if_open(settings)
        torch.set_num_threads(settings.torch_threads or default_torch_threads(settings.api_processes))
        store = RunStore(settings.home)
        batcher = Batcher(settings.batch_max_size, settings.batch_max_wait_ms, settings.max_queue_images, metrics)
        registry = build_registry(settings, store, batcher, metrics)
        batcher.start()
        app.state.settings, app.state.store, app.state.registry, app.state.batcher = settings, store, registry, batcher
        app.state.draining = asyncio.Event()  # set by drain_on_signals; made here, on the loop that serves
        try:
            # Load the default now, so neither the first request nor /ready pays for it; none yet is not fatal.
            await anyio.to_thread.run_sync(registry.get)
        except ConvLensError as e:
            log.warning("no default model loaded at startup: %s", e)
        # What startup allocated lives as long as the process: keep it out of the collector's full passes, which
        # would otherwise walk every torch and FastAPI object while requests wait.
        gc.freeze()
        try:
            with drain_on_signals(asyncio.get_running_loop(), app.state.draining):
                yield
        finally:
            batcher.close()
            metrics.process_exited()

    app = FastAPI(
        title="ConvLens",
        version="0.1.0",
        summary="Train, serve and look inside a ResNet18 CIFAR classifier.",
        lifespan=lifespan,
        docs_url=None,  # served by routes/ui.py from the bundled Swagger UI: /docs works without internet
        # CONVLENS_AUTH=all: a key on every route but /health and the web page (require_read_access says which).
        dependencies=[auth.ReadAccess] if settings.auth == "all" else None,
        responses={**limits.RESPONSES, **({401: auth.AUTH_401} if settings.auth == "all" else {})},
    )
    app.state.settings, app.state.metrics = settings, metrics
    app.state.sse_limiter = StreamLimiter(settings.max_sse_per_client)
    errors.install(app)
    limits.install(app, settings.max_upload_bytes, settings.max_url_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware, log_requests=settings.access_log)  # outermost: every answer has an id
    # /predict first: the router tries routes in order, and the busiest path should not wait behind fifty others.
    for module in (predict, health, models, visual, visualize, explain, jobs, sweeps, compare, timelapse, ui):
        app.include_router(module.router)
    app.include_router(atlas_routes.router)
    auth.openapi_security_only_with_keys(app, settings)
    return app
