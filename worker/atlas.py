"""The `convlens.atlas` task: render a feature-visualization atlas chunk by chunk, resuming what a killed worker left.

One delivery is idempotent by atlas id, as training's is: a missing atlas is logged and dropped, a finished one is
a no-op, one whose lease a live worker holds is a dropped duplicate; otherwise the worker takes the lease, counts
a lost worker if the atlas was left `running` (failed after CONVLENS_MAX_ATTEMPTS), and renders only the chunks
not yet on disk (models/featurevis/atlas.py). Cancel (the flag file) and a warm shutdown stop it between two
optimization steps: `cancelled` keeps the finished chunks; a shutdown sets it back to `queued` and sends it again.

The lease, the lost-worker count and the re-send of atlases the broker forgot are training's, in one place:
worker/reconcile.py (`deliver`, `reconcile`, over an atlas `JobKind`).

torch, the model loader and the renderer are imported inside the task, so a worker starts as fast as before.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Task

from jobqueue.app import send_atlas
from jobqueue.contract import ATLAS_TASK, TERMINAL
from models.errors import ConvLensError
from worker.celery_app import worker_app
from worker.reconcile import atlas_jobs, atlas_store, deliver, flags
from worker.settings import WorkerSettings
from worker.tasks import STOPPING, begin, ended

if TYPE_CHECKING:
    from models.featurevis.atlas import AtlasStore

log = logging.getLogger("convlens.atlas")
app = worker_app()
HEARTBEAT_S = 1.0


class AtlasFailed(Exception):
    """The atlas ended `failed` (atlas.json has the error)."""


def _summary(rec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    keys = ("id", "status", "attempts", "lost", "progress", "error")
    return {**{k: rec.get(k) for k in keys}, **extra}


class _Beat:
    """Writes progress into atlas.json at most once per HEARTBEAT_S, and always when a chunk finished."""

    def __init__(self, store: AtlasStore, atlas_id: str) -> None:
        self.store, self.atlas_id, self.last = store, atlas_id, 0.0

    def __call__(self, progress: dict[str, Any], force: bool) -> None:
        now = time.monotonic()
        if force or now - self.last >= HEARTBEAT_S:
            self.last = now
            self.store.update(self.atlas_id, progress={**progress, "phase": "render"}, heartbeat=time.time())


def execute_atlas(
    store: AtlasStore, settings: WorkerSettings, atlas_id: str, owner: dict[str, Any], stop: Callable[[], bool]
) -> dict[str, Any]:
    """Render the atlas's missing chunks under the lease we hold, keeping atlas.json the source of truth."""
    from models.device import resolve_device
    from models.featurevis.atlas import AtlasSpec, Stopped, dataset_color_cov, render_atlas
    from models.loader import load_model
    from models.shipped import SHIPPED_DIR

    rec = store.read(atlas_id)
    if store.cancel_requested(atlas_id):
        return store.update(atlas_id, status="cancelled", finished=time.time())
    attempt = int(rec.get("attempts", 0)) + 1
    now = time.time()
    store.update(
        atlas_id, status="running", started=rec.get("started") or now, heartbeat=now, attempts=attempt, error=None,
        worker=owner,
    )  # fmt: skip
    t0 = time.monotonic()
    try:
        spec = AtlasSpec.from_json(rec["spec"])
        device = resolve_device(settings.device)
        model, meta, _ = load_model(settings.home, rec["model"], rec["sha256"], rec.get("stem"), [SHIPPED_DIR], device)
        cov = dataset_color_cov(meta, settings.data_root)
        should_stop = lambda: stop() or store.cancel_requested(atlas_id)  # noqa: E731
        rendered = render_atlas(store, atlas_id, spec, model, meta, cov, attempt, _Beat(store, atlas_id), should_stop)
    except Stopped:
        if store.cancel_requested(atlas_id):  # a user's cancel: what is finished stays, and is served
            return store.update(atlas_id, status="cancelled", finished=time.time())
        progress = {**(store.read(atlas_id).get("progress") or {}), "phase": "interrupted"}
        return store.update(atlas_id, status="queued", progress=progress)  # a shutdown: sent again below
    except ConvLensError as e:
        return store.update(atlas_id, status="failed", error=str(e), finished=time.time())
    except Exception as e:  # a bug, or an atlas.json edited by hand: fail with the reason, never loop on it
        error = f"{type(e).__name__}: {e}"
        tb = traceback.format_exc()[-4000:]
        return store.update(atlas_id, status="failed", error=error, traceback=tb, finished=time.time())
    seconds = round(time.monotonic() - t0, 2)
    log.info("atlas %s: %d chunks rendered in %.1f s (attempt %d)", atlas_id, rendered, seconds, attempt)
    runs = [*rec.get("attempt_log", []), {"attempt": attempt, "chunks_rendered": rendered, "seconds": seconds}]
    return store.update(atlas_id, status="succeeded", finished=time.time(), attempt_log=runs)


def run_atlas_job(
    store: AtlasStore,
    settings: WorkerSettings,
    atlas_id: str,
    node: str,
    send: Callable[[str], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """One delivery of an atlas: a no-op if it is finished or held by a live worker, else render what is missing."""
    from models.featurevis.atlas import AtlasNotFound

    try:
        rec = store.read(atlas_id)
    except (AtlasNotFound, ConvLensError) as e:
        log.error("atlas %s: %s (do the API and the worker share CONVLENS_HOME?)", atlas_id, e)
        return {"id": atlas_id, "status": "missing"}
    if rec.get("status") in TERMINAL:
        return _summary(rec, duplicate=True)
    execute = lambda owner, should_stop: execute_atlas(store, settings, atlas_id, owner, should_stop)  # noqa: E731
    rec, outcome = deliver(atlas_jobs(store), settings, atlas_id, node, execute, send, stop)
    if outcome == "done" and rec["status"] == "failed":
        raise AtlasFailed(f"atlas {atlas_id}: {rec.get('error')}")
    return _summary(rec, **flags(outcome))


@app.task(name=ATLAS_TASK, bind=True)
def atlas(self: Task, atlas_id: str) -> dict[str, Any]:
    """Render (or resume) the atlas `atlas_id` of the run store."""
    settings, node = begin(self, "atlas", atlas_id)
    summary = run_atlas_job(
        atlas_store(settings.home), settings, atlas_id, node, lambda aid: send_atlas(self.app, aid), STOPPING.is_set
    )
    return ended("atlas", atlas_id, summary)
