"""The `convlens.atlas` task: render a feature-visualization atlas chunk by chunk, resuming what a killed worker left.

One delivery is idempotent by atlas id, as training's is: a missing atlas is logged and dropped, a finished one is
a no-op, one whose lease a live worker holds is a dropped duplicate; otherwise the worker takes the lease, counts
a lost worker if the atlas was left `running` (failed after CONVLENS_MAX_ATTEMPTS), and renders only the chunks
not yet on disk (models/featurevis/atlas.py). Cancel (the flag file) and a warm shutdown stop it between two
optimization steps: `cancelled` keeps the finished chunks; a shutdown sets it back to `queued` and sends it again.

The file queue cannot deliver again a message its dead worker took, and Redis does so only after the visibility
timeout (days), so on start and every CONVLENS_RECONCILE_INTERVAL_S a worker also re-sends its queue's atlases
left `running` under a dead lease, or `queued` with no message waiting: worker/reconcile.py's rules for runs.

torch, the model loader and the renderer are imported inside the task, so a worker starts as fast as before.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.signals import worker_ready, worker_shutdown
from kombu.transport import filesystem

from jobqueue.app import send_atlas
from jobqueue.contract import ATLAS_TASK, TERMINAL
from models.errors import ConvLensError
from worker.celery_app import worker_app
from worker.reconcile import Lease, lease_state, owner_info
from worker.settings import WorkerSettings, get_worker_settings
from worker.tasks import STOPPING

if TYPE_CHECKING:
    from models.featurevis.atlas import AtlasStore

log = logging.getLogger("convlens.atlas")
app = worker_app()
HEARTBEAT_S = 1.0


class AtlasFailed(Exception):
    """The atlas ended `failed` (atlas.json has the error)."""


def _store(home: Path) -> AtlasStore:
    from models.featurevis.atlas import AtlasStore

    return AtlasStore(home)


def _summary(rec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    keys = ("id", "status", "attempts", "lost", "progress", "error")
    return {**{k: rec.get(k) for k in keys}, **extra}


def record_lost(store: AtlasStore, rec: dict[str, Any], reason: str, max_attempts: int) -> dict[str, Any]:
    """Count a lost worker on an atlas we now hold: back to queued, or cancelled, or failed (bounded attempts)."""
    aid, lost = rec["id"], int(rec.get("lost", 0)) + 1
    if store.cancel_requested(aid):
        return store.update(aid, status="cancelled", lost=lost, finished=time.time())
    if lost >= max_attempts:
        error = f"worker lost {lost} times (last: {reason}); gave up after CONVLENS_MAX_ATTEMPTS={max_attempts}"
        log.error("atlas %s: %s", aid, error)
        return store.update(aid, status="failed", lost=lost, error=error, finished=time.time())
    log.warning(
        "atlas %s: %s; re-queued, it resumes after its last finished chunk (lost %d of %d)",
        aid,
        reason,
        lost,
        max_attempts,
    )
    return store.update(aid, status="queued", lost=lost, progress={**(rec.get("progress") or {}), "phase": "requeued"})


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
    if stop():  # a warm shutdown began, yet the consumer handed over one more message: give it back untouched
        if send:
            send(atlas_id)
        return _summary(rec, requeued=True)
    owner = owner_info(node)
    lease = Lease.claim(store.dir(atlas_id), owner, settings)
    if lease is None:
        log.info("atlas %s is held by a live worker; dropping this duplicate delivery", atlas_id)
        return _summary(rec, duplicate=True)
    with lease:
        rec = store.read(atlas_id)  # again, now that no one else can write it
        if rec.get("status") in TERMINAL:
            return _summary(rec, duplicate=True)
        if rec.get("status") == "running":  # its worker died and no reconciler has seen it yet
            gone = (rec.get("worker") or {}).get("node", "?")
            rec = record_lost(store, rec, f"worker {gone} is gone", settings.max_attempts)
            if rec["status"] != "queued":
                return _summary(rec)
        rec = execute_atlas(store, settings, atlas_id, owner, lambda: stop() or lease.lost)
    if rec["status"] == "queued" and not lease.lost:
        log.warning("atlas %s interrupted by shutdown; re-queued", atlas_id)
        if send:
            send(atlas_id)
        return _summary(rec, requeued=True)
    if rec["status"] == "failed":
        raise AtlasFailed(f"atlas {atlas_id}: {rec.get('error')}")
    return _summary(rec)


@app.task(name=ATLAS_TASK, bind=True)
def atlas(self: Task, atlas_id: str) -> dict[str, Any]:
    """Render (or resume) the atlas `atlas_id` of the run store."""
    settings = get_worker_settings()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    node = str(self.request.hostname or "worker")
    log.info("atlas %s taken by %s", atlas_id, node)
    summary = run_atlas_job(
        _store(settings.home), settings, atlas_id, node, lambda aid: send_atlas(self.app, aid), STOPPING.is_set
    )
    log.info("atlas %s %s", atlas_id, "re-queued" if summary.get("requeued") else summary.get("status"))
    return summary


# ---- reconcile: atlases the broker forgot ----------------------------------------------------------------------


def waiting_atlas_ids(app: Celery, queue: str) -> set[str] | None:
    """Atlas ids with a message waiting in the queue; None if the broker cannot say (then nothing is re-sent)."""
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=2)
            ch: Any = conn.default_channel
            if isinstance(ch, filesystem.Channel):
                raws = [p.read_bytes() for p in Path(ch.data_folder_in).glob(f"*.{queue}.msg") if p.is_file()]
            elif hasattr(ch, "_q_for_pri") and hasattr(ch, "client"):  # Redis: one list per priority step
                keys = {ch._q_for_pri(queue, p) for p in ch.priority_steps}
                raws = [m for k in keys for m in ch.client.lrange(k, 0, -1)]
            else:
                return None
    except Exception as e:  # a broker that cannot be read now: re-send nothing rather than guess
        log.warning("cannot list queue %r: %s", queue, e)
        return None
    ids = set()
    for raw in raws:
        try:
            headers = json.loads(raw).get("headers") or {}
        except (ValueError, AttributeError):
            continue
        if headers.get("task") == ATLAS_TASK and headers.get("id"):
            ids.add(str(headers["id"]))
    return ids


def reconcile_atlases(
    store: AtlasStore,
    settings: WorkerSettings,
    send: Callable[[str], None],
    waiting: Callable[[], set[str] | None],
    node: str = "reconciler",
    now: float | None = None,
) -> list[str]:
    """One pass over this queue's atlases; returns the ids sent again (running under a dead lease, or queued with
    no message in the broker past the grace period)."""
    now = now or time.time()
    records = store.list_atlases()
    in_broker = waiting() if any(r.get("status") == "queued" for r in records) else set()
    sent = []
    for rec in records:
        aid, status = str(rec.get("id", "")), rec.get("status")
        if rec.get("queue") != settings.queue:
            continue
        if status == "running":
            state, why = lease_state(store.dir(aid), settings.stale_heartbeat_s, now)
            fresh = now - float(rec.get("heartbeat") or rec.get("updated") or 0) < settings.stale_heartbeat_s
            if state == "alive" or (state == "absent" and fresh):
                continue
            lease = Lease.claim(store.dir(aid), owner_info(node), settings)
            if lease is None:
                continue  # another worker took it over just now
            try:
                rec = record_lost(store, store.read(aid), why, settings.max_attempts)
            finally:
                lease.release()
            if rec["status"] != "queued":
                continue
        elif not (status == "queued" and in_broker is not None and aid not in in_broker):
            continue
        elif now - float(rec.get("updated") or 0) < settings.requeue_grace_s:
            continue  # the API may be sending it right now
        elif store.cancel_requested(aid):
            store.update(aid, status="cancelled", finished=now)
            continue
        send(aid)
        sent.append(aid)
    return sent


def reconcile_now(app: Celery, settings: WorkerSettings, node: str) -> list[str]:
    sent = reconcile_atlases(
        _store(settings.home),
        settings,
        lambda aid: send_atlas(app, aid),
        lambda: waiting_atlas_ids(app, settings.queue),
        node,
    )
    if sent:
        log.warning("reconcile: atlases sent again: %s", ", ".join(sent))
    return sent


_stop = threading.Event()


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Re-send forgotten atlases before taking work, then keep checking while the worker runs."""
    settings = get_worker_settings()
    app_: Celery = sender.app
    node = str(getattr(sender, "hostname", "worker"))

    def once() -> None:
        try:
            reconcile_now(app_, settings, node)
        except Exception:  # the worker must keep serving even if one pass fails
            log.exception("atlas reconcile failed")

    once()
    if settings.reconcile_interval_s > 0:

        def loop() -> None:
            while not _stop.wait(settings.reconcile_interval_s):
                once()

        threading.Thread(target=loop, name="convlens-atlas-reconcile", daemon=True).start()


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    _stop.set()
