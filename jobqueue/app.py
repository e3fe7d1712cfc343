"""The Celery app factory: Redis when a broker URL is set, else an embedded file queue under <home>/queue.

Both sides build their app here from the same settings, so they agree on broker, queue and serialization; the API
sends by task name (`send_train`) and never imports the worker's code, torch included.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.transport import filesystem
from kombu.utils.json import dumps

from jobqueue.contract import ATLAS_TASK, TRAIN_TASK
from jobqueue.settings import CommonSettings


class AtomicFilesystemChannel(filesystem.Channel):
    """kombu's file channel, publishing each message by rename so no consumer reads it half-written."""

    # kombu's own two base classes disagree on this signature; this one matches the filesystem channel's.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        # kombu creates the .msg file and then writes it; a consumer that moves it in between reads an
        # empty message and its consumer loop dies (kombu#1551). A ".tmp" suffix matches no queue.
        name = f"{time.time_ns() // 1_000_000:015d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        with open(final + ".tmp", "wb") as f:
            f.write(dumps(payload).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(final + ".tmp", final)


class AtomicFilesystemTransport(filesystem.Transport):
    """The embedded broker's transport (`filesystem://` with atomic publishing)."""

    Channel = AtomicFilesystemChannel


def is_redis(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("redis://", "rediss://", "redis+socket://"))


def embedded_folders(settings: CommonSettings) -> dict[str, Path]:
    """The file queue's folders: messages (in = out: one machine), exchange bindings, delivered copies."""
    q = settings.queue_dir.resolve()
    return {name: q / name for name in ("messages", "control", "processed", "results")}


def make_celery(settings: CommonSettings, results: bool = True, include: tuple[str, ...] = ()) -> Celery:
    """A Celery app for these settings; `results=False` for a process that only sends (the API); `include`: the
    task modules of a worker (which then becomes the current app)."""
    app = Celery("convlens", set_as_current=bool(include), include=list(include))
    conf: dict[str, Any] = {
        # JSON only: a pickle payload from whoever can write to the broker would run code in the worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Ack after the job, not at delivery: a worker that dies mid-job leaves the message unacked.
        "task_acks_late": True,
        # A pool child killed by the OS (OOM) requeues its job instead of acking it (prefork pools).
        "task_reject_on_worker_lost": True,
        # A failed job is recorded in the run store; redelivering it would only fail again.
        "task_acks_on_failure_or_timeout": True,
        # Reserve no second job while one trains: it would wait hours and be lost with this worker.
        "worker_prefetch_multiplier": 1,
        # One job per worker (per GPU): solo runs it in the main process, so nothing forks after CUDA init.
        "worker_pool": "solo",
        "worker_concurrency": 1,
        # The training queue, and the one task routed to it.
        "task_default_queue": settings.queue,
        "task_routes": {TRAIN_TASK: {"queue": settings.queue}},
        # STARTED shows in Celery tools as soon as a worker takes the job.
        "task_track_started": True,
        # A job outlives a broker outage: keep reconnecting and keep the running job going.
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # The API must not hang on a down broker: a few quick retries, then it answers without sending.
        "broker_connection_timeout": 4.0,
        "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        "result_expires": 7 * 24 * 3600,
    }
    if is_redis(settings.broker_url):
        # Redis redelivers an unacked message after visibility_timeout: it must exceed the longest job, or a
        # second worker starts a job that is still running. Celery reads it from both option sets.
        redis_opts = {"visibility_timeout": settings.visibility_timeout_s, "socket_keepalive": True}
        conf["broker_url"] = settings.broker_url
        conf["broker_transport_options"] = dict(redis_opts)
        # Progress reports must not stall training while Redis is away: few retries, then drop the report.
        conf["result_backend_transport_options"] = {
            **redis_opts,
            "retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        }
    else:
        folders = embedded_folders(settings)
        for folder in folders.values():
            # The file backend refuses a missing folder, and kombu writes into these without creating them.
            folder.mkdir(parents=True, exist_ok=True)
        conf["broker_url"] = "filesystem://localhost/"
        conf["broker_transport"] = f"{__name__}:AtomicFilesystemTransport"
        conf["broker_transport_options"] = {
            "data_folder_in": str(folders["messages"]),
            "data_folder_out": str(folders["messages"]),
            "control_folder": str(folders["control"]),
            # Delivery renames into this folder (same disk: atomic, so two workers never take one message);
            # /tmp may be another disk, where kombu's move is copy + delete.
            "store_processed": True,
            "processed_folder": str(folders["processed"]),
            # Checks for new files twice a second (kombu's default is once).
            "polling_interval": 0.5,
        }
        # Broadcasts over files leave a message for every dead worker's queue; nothing here needs them.
        conf["worker_enable_remote_control"] = False
    if results:
        default = settings.broker_url if is_redis(settings.broker_url) else None
        backend = settings.result_backend or default
        conf["result_backend"] = backend or f"file://{embedded_folders(settings)['results']}"
    app.conf.update(conf)
    return app


def sender_app(settings: CommonSettings) -> Celery:
    """What the API uses to enqueue: the worker's broker and queue, no result backend (the Redis one subscribes to
    every sent task's channel and never lets go)."""
    return make_celery(settings, results=False)


def send_train(app: Celery, run_id: str) -> None:
    """Enqueue a run by task name; the task id is the run id, so every delivery of a run is the same task."""
    queue = app.conf.task_default_queue
    app.send_task(TRAIN_TASK, args=[run_id], task_id=run_id, queue=queue)


def send_atlas(app: Celery, atlas_id: str) -> None:
    """Enqueue an atlas by task name on the training queue (its workers run one job at a time, an atlas or a
    training run); the task id is the atlas id, so every delivery of an atlas is the same task."""
    queue = app.conf.task_default_queue
    app.send_task(ATLAS_TASK, args=[atlas_id], task_id=atlas_id, queue=queue)
