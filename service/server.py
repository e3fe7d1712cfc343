"""`serve(settings)`: the API under uvicorn, plus a local Celery worker on the embedded queue when no broker is set.

CONVLENS_API_PROCESSES=N (> 1) runs N API processes on one listening socket (uvicorn's supervisor, which restarts
one that dies). Each has its own event loop, micro-batcher, model copies and per-client stream limits; they share
the run store (registry.json, so a new default reaches all of them), the queue and /metrics (prometheus-client's
multiprocess mode, in PROMETHEUS_MULTIPROC_DIR or a temporary folder). They read their settings from the
environment, as `convlens serve` leaves it.

Graceful shutdown (SIGTERM or Ctrl-C): uvicorn stops listening at once (new connections are refused), closes idle
keep-alive connections, and lets requests in flight finish for up to CONVLENS_SHUTDOWN_TIMEOUT_S before it
cancels them. Open event streams (GET /jobs/{id}/events) would otherwise hold that wait to its end: the app ends
them on the signal (service.app.drain_on_signals), and their clients reconnect with Last-Event-ID. A SIGTERM
exits 0.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
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
from service.metrics import MULTIPROC_ENV, multiprocess_dir  # noqa: E402
from service.settings import Settings, get_settings  # noqa: E402

log = logging.getLogger("convlens.server")

WORKER_STOP_TIMEOUT_S = 30.0
LOG = ["--loglevel=INFO"]


def worker_command() -> list[str]:
    """One job at a time (`--pool=solo`): training uses every core, and the queue is a single folder."""
    queue = os.environ.get("CONVLENS_QUEUE", "train")  # the same variable the worker's settings and the API read
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=solo", "-Q", queue, *LOG]


def start_worker(settings: Settings) -> subprocess.Popen[bytes] | None:
    """Start the embedded-queue worker, or None when a broker is configured (its workers run elsewhere)."""
    if settings.broker_url or not settings.embedded_worker:
        return None
    if importlib.util.find_spec("worker.celery_app") is None:
        log.warning("worker.celery_app is not installed: serving without a local worker (POST /train will queue)")
        return None
    env = {**os.environ, "CONVLENS_HOME": str(settings.home)}
    if settings.data_dir:
        env["CONVLENS_DATA_DIR"] = str(settings.data_dir)
    # Its own session: Ctrl-C reaches only the server, which then stops the worker once, in order.
    proc = subprocess.Popen(worker_command(), env=env, start_new_session=True)
    log.info("started a local worker on the embedded queue (pid %d)", proc.pid)
    return proc


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = WORKER_STOP_TIMEOUT_S) -> None:
    """SIGTERM (Celery's warm shutdown: the running job checkpoints and is re-queued), then SIGKILL."""
    if proc.poll() is not None:
        return
    log.info("stopping the local worker (pid %d)", proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("worker %d did not stop within %.0fs; killing it", proc.pid, timeout)
        proc.kill()
        proc.wait()


class _Server(uvicorn.Server):
    """uvicorn's server, with `on_exit` called after it stops. A SIGTERM is a normal stop: it is not re-raised
    (exit status 0, not -15); a Ctrl-C still is (as KeyboardInterrupt, which `serve` swallows)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self.on_exit()
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def uvicorn_config(app: FastAPI | str, settings: Settings, **more: object) -> uvicorn.Config:
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


def process_app() -> FastAPI:
    """The app of one of several API processes (`uvicorn --factory service.server:process_app`): its settings
    from the environment, its logs through the same handler as the parent's."""
    settings = get_settings()
    configure_logging(settings.log_format, secrets=settings.api_key)
    return create_app(settings)


def serve_processes(settings: Settings, worker: subprocess.Popen[bytes] | None) -> None:
    """settings.api_processes API processes on one socket, until Ctrl-C or SIGTERM; then the worker stops."""
    own_dir, shared = None, multiprocess_dir()
    if shared is None:
        own_dir = tempfile.mkdtemp(prefix="convlens-metrics-")
        os.environ[MULTIPROC_ENV] = own_dir  # before the processes start: they pick their metric store on import
    else:  # a folder of the operator's: what an earlier run left would be summed in
        for stale in Path(shared).glob("*.db"):
            stale.unlink(missing_ok=True)
    # The processes read the environment: carry what the caller may have set on the Settings object.
    os.environ |= {"CONVLENS_HOME": str(settings.home), "CONVLENS_HOST": settings.host}
    os.environ |= {"CONVLENS_PORT": str(settings.port), "CONVLENS_API_PROCESSES": str(settings.api_processes)}
    if settings.data_dir:
        os.environ["CONVLENS_DATA_DIR"] = str(settings.data_dir)
    config = uvicorn_config("service.server:process_app", settings, factory=True, workers=settings.api_processes)
    sock = config.bind_socket()
    try:
        Multiprocess(config, sockets=[sock]).run()  # SIGTERM/Ctrl-C: stops every process gracefully, then returns
    finally:
        sock.close()
        if worker:
            stop_worker(worker)
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)


def serve(settings: Settings) -> None:
    """Serve the API on settings.host:settings.port until Ctrl-C or SIGTERM, with a local worker if no broker."""
    # One handler for everything, uvicorn's loggers included (log_config=None leaves them propagating to it).
    configure_logging(settings.log_format, secrets=settings.api_key)
    worker = start_worker(settings)
    if settings.api_processes > 1:
        serve_processes(settings, worker)
        return
    server = _Server(
        uvicorn_config(create_app(settings), settings), on_exit=lambda: stop_worker(worker) if worker else None
    )
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled; everything has stopped by now
    finally:
        if worker:
            stop_worker(worker)


if __name__ == "__main__":
    serve(get_settings())
