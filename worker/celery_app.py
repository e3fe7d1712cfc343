"""The worker's Celery app: `jobqueue`'s factory with the worker's settings and task modules.

Run a worker with `convlens worker` or `celery -A worker.celery_app worker`; torch is imported by the task, not
here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from jobqueue.app import make_celery
from worker.settings import get_worker_settings

TASK_MODULES = ("worker.tasks", "worker.reconcile", "worker.atlas")


@lru_cache
def worker_app() -> Celery:
    """The worker's app, from its settings (built on first use: importing this module has no side effects).

    Building it also hands the worker's logging to worker/logs.py (the API's format, through Celery's signals).
    """
    from worker.logs import install as install_logging

    install_logging()
    return make_celery(get_worker_settings(), include=TASK_MODULES)


def __getattr__(name: str) -> Any:
    # `celery -A worker.celery_app` looks up `app` here; building it lazily keeps imports free of mkdir.
    if name == "app":
        return worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
