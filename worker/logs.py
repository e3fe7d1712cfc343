"""The worker logs like the API, through models.logs' one handler (CONVLENS_LOG_FORMAT json|text), no secrets.

Celery configures logging itself unless a receiver of its `setup_logging` signal does it (Celery's documented way
to replace its setup); `install()` connects one that routes every logger, Celery's too, through
`models.logs.configure`, with a filter that stamps `task_id` and `task_name` on the records written while a
task runs (the task id of a training job is its run id). The secrets it scrubs: CONVLENS_API_KEY's keys and any
password in the broker or result backend URL, besides anything shaped like a credential.

In JSON mode the worker's plain-text outputs become records too: the startup banner (logged as one record instead
of printed) and the warm-shutdown notice that Celery writes straight to stdout on SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
from typing import Any
from urllib.parse import urlsplit

from celery import current_task
from celery.signals import celeryd_after_setup, celeryd_init, setup_logging, worker_ready, worker_shutting_down

from models.logs import configure, resolve_format
from worker.settings import WorkerSettings, get_worker_settings

log = logging.getLogger("convlens.worker")


def secrets(settings: WorkerSettings) -> list[str]:
    """What must never reach a log line: the API keys and any password in the broker or result backend URL."""
    out = list(settings.api_key)
    for url in (settings.broker_url, settings.result_backend):
        with contextlib.suppress(ValueError):
            password = urlsplit(url or "").password
            if password:
                out.append(password)
    return out


class TaskFilter(logging.Filter):
    """Stamps `task_id` and `task_name` on each record about a task: Celery's, or one written while it runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if hasattr(record, "task_id"):
            return True
        data = getattr(record, "data", None)  # Celery's own task lines (received, succeeded, failed) carry it
        if isinstance(data, dict) and data.get("id"):
            record.task_id, record.task_name = data["id"], data.get("name")
        elif current_task:
            record.task_id, record.task_name = current_task.request.id, current_task.name
        return True


def _setup_logging(loglevel: int | str | None = None, logfile: str | None = None, **_: Any) -> None:
    settings = get_worker_settings()
    level = logging.getLevelName(loglevel.upper()) if isinstance(loglevel, str) else loglevel
    handler = logging.handlers.WatchedFileHandler(logfile, encoding="utf-8") if logfile else None
    configure(settings.log_format, secrets(settings), level=level or logging.INFO, handler=handler).addFilter(
        TaskFilter()
    )


def _early_setup(options: dict[str, Any] | None = None, **_: Any) -> None:
    """The worker is starting: log through our handler already, warnings included. Celery checks its privileges
    (a SecurityWarning when run as root) after this signal and sends `setup_logging` only later."""
    options = options or {}
    _setup_logging(options.get("loglevel"), options.get("logfile"))
    logging.captureWarnings(True)


def _after_setup(sender: str, instance: Any, **_: Any) -> None:
    settings = get_worker_settings()
    if instance.quiet:
        return
    # Celery would print its multi-line banner to stdout: machines get it as one record, people one short line.
    instance.quiet = True
    if resolve_format(settings.log_format) == "json":
        log.info("worker %s settings: %s", sender, settings.model_dump(mode="json"))  # redacted by the handler
        log.info("celery worker %s\n%s%s", sender, instance.startup_info(artlines=False), instance.extra_info() or "")
    else:
        where = settings.broker_url or f"the embedded queue in {settings.queue_dir}"
        log.info("worker %s: queue %r on %s, run store %s", sender, settings.queue, where, settings.home)


def _quiet_sigterm(sender: Any, **_: Any) -> None:
    """JSON mode: Celery's SIGTERM handler, without the plain line it writes to stdout (logged by _shutting_down)."""
    worker = getattr(sender, "controller", None)
    if resolve_format(get_worker_settings().log_format) != "json" or worker is None:
        return
    from celery.apps.worker import install_worker_term_handler

    try:
        install_worker_term_handler(worker, verbose=False)  # the same handler (warm shutdown), minus the print
    except ValueError:  # not the main thread: keep Celery's handler as it is
        log.debug("could not replace the SIGTERM handler outside the main thread")


def _shutting_down(sender: str, sig: str, how: str, **_: Any) -> None:
    log.info("worker %s: %s shutdown (%s)", sender, how.lower(), sig)


def install() -> None:
    """Connect the receivers (once per process): call it before the worker starts, as `worker_app()` does."""
    celeryd_init.connect(_early_setup, weak=False, dispatch_uid="convlens.early_setup")
    setup_logging.connect(_setup_logging, weak=False, dispatch_uid="convlens.setup_logging")
    celeryd_after_setup.connect(_after_setup, weak=False, dispatch_uid="convlens.after_setup")
    worker_ready.connect(_quiet_sigterm, weak=False, dispatch_uid="convlens.quiet_sigterm")
    worker_shutting_down.connect(_shutting_down, weak=False, dispatch_uid="convlens.shutting_down")
