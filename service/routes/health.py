"""Routes: liveness, readiness (default model and broker) and Prometheus metrics."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from models.errors import ConvLensError
from service.deps import MetricsDep, RegistryDep, SettingsDep
from service.schemas import Health, Ready
from service.settings import Settings

router = APIRouter(tags=["ops"])

PROBE_TIMEOUT_S = 0.5


def _where(url: str) -> str:
    """scheme://host:port of a URL, never its credentials."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname or ''}{f':{u.port}' if u.port else ''}"


def broker_check(settings: Settings) -> tuple[bool, str]:
    """Redis: PING with a short timeout; embedded queue: its folder is writable; other brokers: a TCP connect."""
    url = settings.broker_url
    if not url or url.startswith("filesystem://"):
        d = settings.queue_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return False, f"embedded queue folder {d} cannot be created: {e.strerror}"
        if os.access(d, os.W_OK | os.X_OK):
            return True, f"embedded queue {d} writable"
        return False, f"embedded queue folder {d} is not writable"
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S)
        try:
            client.ping()
            return True, f"{_where(url)} reachable"
        except (redis.RedisError, OSError) as e:
            return False, f"broker {_where(url)} unreachable: {type(e).__name__}: {e}"
        finally:
            client.close()
    u = urlsplit(url)
    try:
        socket.create_connection((u.hostname or "localhost", u.port or 5672), timeout=PROBE_TIMEOUT_S).close()
        return True, f"{_where(url)} accepts connections"
    except OSError as e:
        return False, f"broker {_where(url)} unreachable: {e}"


@router.get("/health", response_model=Health, summary="Liveness")
async def health() -> Health:
    """The process is up and its event loop answers."""
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Ready,
    responses={503: {"description": "something is down; `detail` names it", "model": Ready}},
    summary="Readiness",
)
def ready(registry: RegistryDep, settings: SettingsDep) -> Response:
    """Ready when the default model is loaded (loading it if needed) and the broker is reachable."""
    checks: dict[str, str] = {}
    down: list[str] = []
    try:
        loaded = registry.get()
        checks["model"] = f"{loaded.id} loaded"
    except ConvLensError as e:
        checks["model"] = str(e)
        down.append(f"model: {e}")
    ok, msg = broker_check(settings)
    checks["broker"] = msg
    if not ok:
        down.append(f"broker: {msg}")
    if down:
        body = {"status": "not ready", "detail": "not ready: " + "; ".join(down), "checks": checks}
        return JSONResponse(body, status_code=503)
    return JSONResponse(Ready(status="ready", checks=checks).model_dump())


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text format)")
def metrics(m: MetricsDep) -> Response:
    """Request counts and latencies per route, micro-batch sizes, queue depth, model load times, process stats."""
    body, content_type = m.render()
    return Response(body, media_type=content_type)
