"""Prometheus metrics (prometheus-client), one registry per app so tests can build many apps in one process.

With several API processes (CONVLENS_API_PROCESSES > 1) `service.server` sets PROMETHEUS_MULTIPROC_DIR before they
start: each process then keeps its values in files there, and a scrape of any process reports the sum over all
of them (prometheus-client's multiprocess mode; gauges of live processes only). The per-process collectors
(CPU, memory, GC) are left out in that mode: they would describe whichever process answered the scrape.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    multiprocess,
    platform_collector,
    process_collector,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The folder shared by several API processes' metrics, or None for one process."""
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    """The service's metrics, registered on their own CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.shared = multiprocess_dir() is not None
        if not self.shared:
            process_collector.ProcessCollector(registry=r)
            platform_collector.PlatformCollector(registry=r)
            gc_collector.GCCollector(registry=r)
        self.requests = Counter(
            "convlens_http_requests",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "convlens_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "convlens_http_requests_in_flight",
            "HTTP requests being served now (open event streams and this scrape included)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_size = Histogram(
            "convlens_batch_size", "images per forward pass of the micro-batcher", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "convlens_batch_inference_seconds", "time of one batched forward pass", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "convlens_batch_queue_depth", "images waiting for inference", registry=r, multiprocess_mode="livesum"
        )
        self.images = Counter("convlens_images_predicted", "images classified", ["model"], registry=r)
        self.model_load = Gauge(
            "convlens_model_load_seconds",
            "seconds the last load of each model took",
            ["model"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.model_loads = Counter("convlens_model_loads", "models loaded into memory", ["model"], registry=r)

    def observe_load(self, model_id: str, seconds: float) -> None:
        """Record one model load."""
        self.model_load.labels(model_id).set(seconds)
        self.model_loads.labels(model_id).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type (summed over every API process when shared)."""
        if not self.shared:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged), CONTENT_TYPE_LATEST

    def process_exited(self) -> None:
        """This process stops serving: its live gauges (in flight, queue depth) leave the sums."""
        if self.shared:
            multiprocess.mark_process_dead(os.getpid())


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware task overhead): counts and times every HTTP request by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route: Any = scope.get("route")
            # The template (`/models/{model_id}`), never the raw path: unmatched paths must not grow the label set.
            name = getattr(route, "path", None) or "<unmatched>"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, name, str(status[0])).inc()
            self.metrics.latency.labels(method, name).observe(time.perf_counter() - start)
