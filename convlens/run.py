"""`convlens serve` and `convlens worker`: the API, the training worker, and the local worker `serve` starts on the
embedded queue when no broker is configured (what `make serve` runs)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import subprocess
import sys

from convlens.train import worker_settings

log = logging.getLogger("convlens.cli")

WORKER_STOP_TIMEOUT_S = 30.0


def worker_argv(queue: str, loglevel: str, hostname: str | None) -> list[str]:
    """`celery worker` options: one job at a time (solo pool) on the training queue."""
    # No gossip/mingle: they only sync revokes between workers, and add a second to every start.
    argv = ["worker", "--pool=solo", "--concurrency=1", "-Q", queue, f"--loglevel={loglevel}"]
    return [*argv, "--without-gossip", "--without-mingle", *(["-n", hostname] if hostname else [])]


def cmd_worker(ns: argparse.Namespace) -> int:
    """A Celery worker with the project's settings, the command-line options on top of the environment's."""
    from worker.celery_app import worker_app
    from worker.settings import use_worker_settings

    settings = worker_settings(ns)
    use_worker_settings(settings)
    extra = ns.celery_args[1:] if ns.celery_args[:1] == ["--"] else ns.celery_args
    worker_app().worker_main([*worker_argv(settings.queue, ns.loglevel, ns.hostname), *extra])
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    """The API (uvicorn) with, when no broker is configured, a local worker on the embedded queue."""
    from service.server import serve  # sets OMP_WAIT_POLICY before torch loads
    from service.settings import Settings

    given = {"home": ns.home, "data_dir": ns.data, "host": ns.host, "port": ns.port}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    embedded = not settings.broker_url and settings.embedded_worker
    worker = (
        start_embedded_worker(settings.home, settings.data_dir, settings.queue, settings.device) if embedded else None
    )
    serve(settings, on_exit=lambda: stop_worker(worker) if worker else None)
    return 0


def start_embedded_worker(home: object, data_dir: object, queue: str, device: str) -> subprocess.Popen[bytes] | None:
    """`convlens worker` in its own session (Ctrl-C reaches only the server, which then stops it once, in order)."""
    if importlib.util.find_spec("worker.celery_app") is None:
        log.warning("the worker package is not installed: serving without a local worker (POST /train will queue)")
        return None
    cmd = [sys.executable, "-m", "convlens", "worker", "--home", str(home), "--queue", queue, "--device", device]
    cmd += ["--data", str(data_dir)] if data_dir else []
    proc = subprocess.Popen(cmd, start_new_session=True)
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
