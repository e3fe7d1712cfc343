"""Run a training job against the run store: status transitions, a ~1 Hz heartbeat, cancel, resume."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jobqueue.contract import NOT_RESUMED
from models.config import TrainConfig
from models.errors import ConvLensError
from models.runs import RunStore
from models.trainer import TrainResult, train

HEARTBEAT_S = 1.0


class Heartbeat:
    """Writes progress into run.json at most once per `interval` seconds (and always for epoch ends)."""

    def __init__(
        self,
        store: RunStore,
        run_id: str,
        interval: float = HEARTBEAT_S,
        forward: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.store, self.run_id, self.interval, self.forward = store, run_id, interval, forward
        self.last = 0.0

    def __call__(self, progress: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if not force and progress.get("phase") == "train" and now - self.last < self.interval:
            return
        self.last = now
        self.store.update_run(self.run_id, progress=progress, heartbeat=time.time())
        if self.forward:
            self.forward(progress)


def execute_run(
    store: RunStore,
    run_id: str,
    data_root: Path,
    device: str = "auto",
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """Train the run's config to the end (resuming its checkpoint), keeping run.json the source of truth."""
    run = store.read_run(run_id)
    if run["status"] in NOT_RESUMED:
        return run  # delivered again after it finished: nothing to do (idempotent by id)
    try:
        cfg = TrainConfig.model_validate(run["config"])
    except ValidationError as e:  # a run.json edited by hand, or written by another version: fail, naming the field
        where = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())
        return store.update_run(
            run_id, status="failed", error=f"invalid training config: {where}", finished=time.time()
        )
    if store.cancel_requested(run_id):
        return store.update_run(run_id, status="cancelled", finished=time.time())
    store.update_run(
        run_id,
        status="running",
        started=run.get("started") or time.time(),
        heartbeat=time.time(),
        attempts=int(run.get("attempts", 0)) + 1,
        error=None,
    )
    beat = Heartbeat(store, run_id, forward=on_progress)
    cancel = lambda: store.cancel_requested(run_id) or bool(stop_requested and stop_requested())  # noqa: E731
    try:
        result: TrainResult = train(
            cfg,
            store.run_dir(run_id),
            data_root,
            device=device,
            progress=beat,
            should_cancel=cancel,
            resume=True,
            tensorboard=tensorboard,
        )
    except ConvLensError as e:
        return store.update_run(run_id, status="failed", error=str(e), finished=time.time())
    except Exception as e:
        return store.update_run(
            run_id,
            status="failed",
            error=f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc()[-4000:],
            finished=time.time(),
        )
    if result.status == "cancelled" and not store.cancel_requested(run_id):
        # Stopped by the worker (shutdown), not by a user: the job goes back to the queue.
        return store.update_run(run_id, status="queued", progress={"phase": "interrupted", "epoch": result.epoch})
    metrics = {k: v for k, v in result.metrics.items() if k != "confusion"}
    return store.update_run(
        run_id,
        status=result.status,
        finished=time.time(),
        metrics=metrics,
        best_epoch=result.best_epoch,
        best_checkpoint=str(result.best_checkpoint.relative_to(store.home)) if result.best_checkpoint else None,
    )
