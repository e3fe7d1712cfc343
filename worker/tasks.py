"""The `convlens.train` task, kept thin: validate, hold the run's lease, run `execute_run`, report progress."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.signals import worker_shutting_down
from pydantic import ValidationError

from jobqueue.app import send_train
from jobqueue.contract import TERMINAL, TRAIN_TASK
from models.config import TrainConfig
from models.runs import RunStore, validate_run_id
from worker.celery_app import worker_app
from worker.reconcile import deliver, flags, run_jobs
from worker.settings import WorkerSettings, get_worker_settings

log = logging.getLogger("convlens.tasks")
app = worker_app()

# Set on warm shutdown (SIGTERM): the job stops after its current step and goes back to the queue.
STOPPING = threading.Event()


@worker_shutting_down.connect
def _on_shutting_down(**_: Any) -> None:
    STOPPING.set()


class TrainingFailed(Exception):
    """The job ended `failed` (the run store has the error and traceback)."""


def _summary(run: dict[str, Any], **extra: Any) -> dict[str, Any]:
    keys = ("id", "status", "attempts", "lost", "metrics", "best_epoch", "best_checkpoint", "error")
    return {**{k: run.get(k) for k in keys}, **extra}


def run_job(
    store: RunStore,
    settings: WorkerSettings,
    run_id: str,
    node: str,
    report: Callable[[dict[str, Any]], None] | None = None,
    send: Callable[[str], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """One delivery of a run: a no-op if it is finished or held by a live worker, else train (resuming) it."""
    validate_run_id(run_id)
    if not store.exists(run_id):
        log.error("run %s is not in %s: do the API and the worker share CONVLENS_HOME?", run_id, store.home)
        return {"id": run_id, "status": "missing"}
    run = store.read_run(run_id)
    if run["status"] in TERMINAL:
        return _summary(run, duplicate=True)  # delivered again after it finished (idempotent by run id)
    try:
        TrainConfig.model_validate(run["config"])
    except ValidationError as e:
        return _summary(store.update_run(run_id, status="failed", error=f"invalid config: {e}", finished=time.time()))

    def execute(owner: dict[str, Any], should_stop: Callable[[], bool]) -> dict[str, Any]:
        store.update_run(run_id, worker=owner)
        from worker.jobs import execute_run  # torch and the trainer: only in the process that trains

        return execute_run(
            store, run_id, settings.data_root, device=settings.device, on_progress=report,
            stop_requested=should_stop, tensorboard=settings.tensorboard,
        )  # fmt: skip

    run, outcome = deliver(run_jobs(store), settings, run_id, node, execute, send, stop)
    if outcome == "done" and run["status"] == "failed":
        raise TrainingFailed(f"run {run_id}: {run.get('error')}")
    return _summary(run, **flags(outcome))


def _report_progress(task: Task, progress: dict[str, Any]) -> None:
    """Celery PROGRESS state (for Celery tools); best effort: run.json already has it."""
    try:
        task.update_state(state="PROGRESS", meta=progress)
    except Exception as e:  # a result backend outage must not stop training
        log.warning("progress report failed: %s", e)


def begin(task: Task, kind: str, job_id: str) -> tuple[WorkerSettings, str]:
    """What every task does first: this worker's settings and torch threads, and its node name, logged."""
    settings = get_worker_settings()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    node = str(task.request.hostname or "worker")
    log.info("%s %s taken by %s", kind, job_id, node)
    return settings, node


def ended(kind: str, job_id: str, summary: dict[str, Any]) -> dict[str, Any]:
    log.info("%s %s %s", kind, job_id, "re-queued" if summary.get("requeued") else summary.get("status"))
    return summary


@app.task(name=TRAIN_TASK, bind=True)
def train(self: Task, run_id: str) -> dict[str, Any]:
    """Train (or resume) the run `run_id` of the run store."""
    settings, node = begin(self, "job", run_id)
    summary = run_job(
        RunStore(settings.home),
        settings,
        run_id,
        node=node,
        report=lambda p: _report_progress(self, p),
        send=lambda rid: send_train(self.app, rid),
        stop=STOPPING.is_set,
    )
    return ended("job", run_id, summary)
