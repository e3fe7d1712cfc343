"""`serve(settings)`: the API under uvicorn (`convlens serve` also starts a local worker when no broker is set).

CONVLENS_API_PROCESSES=N (> 1) runs N API processes on one listening socket (uvicorn's supervisor, which restarts
one that dies). Each has its own event loop, micro-batcher, model copies and per-client stream limits; they share
the run store (registry.json, so a new default reaches all of them), the queue and /metrics (prometheus-client's
multiprocess mode, in PROMETHEUS_MULTIPROC_DIR or a temporary folder). They read their settings from the
settings object they are handed (pickled into each process by uvicorn's spawn).

Graceful shutdown (SIGTERM or Ctrl-C): uvicorn stops listening at once (new connections are refused), closes idle
keep-alive connections, and lets requests in flight finish for up to CONVLENS_SHUTDOWN_TIMEOUT_S before it
cancels them. Open event streams (GET /jobs/{id}/events) would otherwise hold that wait to its end: the app ends
them on the signal (service.app.drain_on_signals), and their clients reconnect with Last-Event-ID. A SIGTERM
exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Generator
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: the event loop shares these cores with torch. Read when torch
# loads, so set before service.app is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from uvicorn.supervisors import Multiprocess  # noqa: E402

from models.logs import configure as configure_logging  # noqa: E402
from service.app import create_app  # noqa: E402
from service.factory import AppFactory  # noqa: E402
from service.metrics import MULTIPROC_ENV, multiprocess_dir  # noqa: E402
from service.settings import Settings, get_settings  # noqa: E402

log = logging.getLogger("convlens.server")


class _Server(uvicorn.Server):
    """uvicorn's server, with `on_exit` called after it stops. A SIGTERM is a normal stop: it is not re-raised
    (exit status 0, not -15); a Ctrl-C still is (as KeyboardInterrupt, which `serve` swallows)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            announce(self.config.host, self.config.port)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self.on_exit()
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def uvicorn_config(app: FastAPI | str | Callable[[], FastAPI], settings: Settings, **more: object) -> uvicorn.Config:
    """uvicorn's settings for the API, one process or several: the app's RequestIdMiddleware writes the access
    line (with the request id), and log_config=None leaves uvicorn's loggers to the one handler."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        **more,  # type: ignore[arg-type]
    )


def announce(host: str, port: int) -> None:
    """The one line a person needs once the API listens: where the page and the API docs are."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    log.info(
        "ConvLens is up: the page at http://%s:%d/ and the API docs at http://%s:%d/docs", shown, port, shown, port
    )


def process_app(settings: Settings | None = None) -> FastAPI:
    """The app of one of several API processes (a uvicorn factory): the parent's settings, its logs through the
    same handler as the parent's."""
    settings = settings or get_settings()
    configure_logging(settings.log_format, secrets=settings.api_key)
    return create_app(settings)


def serve_processes(settings: Settings, on_exit: Callable[[], None] | None = None) -> None:
    """settings.api_processes API processes on one socket, until Ctrl-C or SIGTERM; then `on_exit`."""
    own_dir, shared = None, multiprocess_dir()
    if shared is None:
        own_dir = tempfile.mkdtemp(prefix="convlens-metrics-")
        os.environ[MULTIPROC_ENV] = own_dir  # before the processes start: they pick their metric store on import
    else:  # a folder of the operator's: what an earlier run left would be summed in
        for stale in Path(shared).glob("*.db"):
            stale.unlink(missing_ok=True)
    config = uvicorn_config(AppFactory(settings), settings, factory=True, workers=settings.api_processes)
    sock = config.bind_socket()
    announce(settings.host, settings.port)
    try:
        Multiprocess(config, sockets=[sock]).run()  # SIGTERM/Ctrl-C: stops every process gracefully, then returns
    finally:
        sock.close()
        if on_exit:
            on_exit()
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)


def serve(settings: Settings, on_exit: Callable[[], None] | None = None) -> None:
    """Serve the API on settings.host:settings.port until Ctrl-C or SIGTERM; then `on_exit` (once)."""
    # One handler for everything, uvicorn's loggers included (log_config=None leaves them propagating to it).
    configure_logging(settings.log_format, secrets=settings.api_key)
    done = once(on_exit)
    if settings.api_processes > 1:
        serve_processes(settings, done)
        return
    server = _Server(uvicorn_config(create_app(settings), settings), on_exit=done)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled; everything has stopped by now
    finally:
        done()


def once(fn: Callable[[], None] | None) -> Callable[[], None]:
    """`fn` callable any number of times, run at most once (shutdown paths may each call it)."""
    called = False

    def run() -> None:
        nonlocal called
        if fn and not called:
            called = True
            fn()

    return run


if __name__ == "__main__":
    serve(get_settings())
