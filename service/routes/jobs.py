"""Routes: training jobs. POST /train enqueues by task name; everything else reads the run store."""

from __future__ import annotations

import logging
import threading
import time
from typing import Annotated, Any, Literal

from celery import Celery
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from jobqueue.app import send_train, sender_app
from jobqueue.contract import LEASE_FILE, TERMINAL
from models.config import TrainConfig
from models.runs import RUN_ID_RE
from service.auth import AUTH_401, WriteAccess
from service.deps import SettingsDep, StoreDep
from service.jobs_curves import render_curves
from service.jobs_sse import CountedStreamingResponse, StreamLimiter, job_events, parse_event_id
from service.jobs_view import CancelAnswer, JobCreated, JobList, Kind, MetricsPage, Status, job_table, metrics_page

log = logging.getLogger("convlens.jobs")
router = APIRouter(tags=["jobs"])

RunId = Annotated[
    str, Path(pattern=RUN_ID_RE.pattern, description="a job id: 1-64 letters, digits, '-' or '_'", examples=["my-run"])
]


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no job with that id"}}
SSE_RETRY_AFTER_S = 5  # a slot frees when one of the client's streams ends: no telling when, so a short pause
_sender_lock = threading.Lock()


def get_sender(request: Request, settings: SettingsDep) -> Celery:
    """The Celery app that sends jobs (built once per app: same broker and queue as the worker)."""
    with _sender_lock:
        sender = getattr(request.app.state, "celery_sender", None)
        if sender is None:
            sender = request.app.state.celery_sender = sender_app(settings)
    return sender  # type: ignore[no-any-return]


SenderDep = Annotated[Celery, Depends(get_sender)]


def _links(request: Request, run_id: str) -> dict[str, str]:
    return {
        "status_url": str(request.url_for("get_job", run_id=run_id)),
        "events_url": str(request.url_for("job_events_stream", run_id=run_id)),
    }


@router.post(
    "/train",
    status_code=202,
    response_model=JobCreated,
    responses={
        400: {"description": "the body is not JSON text (e.g. not UTF-8)"},
        401: AUTH_401,
        409: {"description": "a job with that run_id already exists"},
    },
    dependencies=[WriteAccess],
)
def submit(
    config: TrainConfig,
    request: Request,
    store: StoreDep,
    sender: SenderDep,
    run_id: Annotated[
        str | None, Query(pattern=RUN_ID_RE.pattern, description="name the job (default: a timestamp id)")
    ] = None,
) -> JobCreated:
    """Queue a training job (the config's fields and bounds are in the schema); 422 names a bad field."""
    if run_id and store.exists(run_id):
        raise HTTPException(409, f"job {run_id!r} already exists; choose another run_id")
    rid = store.create_run(config.model_dump(), run_id=run_id)
    # `queue` marks a run the reconciler owns; it is written before the message exists.
    store.update_run(rid, queue=sender.conf.task_default_queue)
    try:
        send_train(sender, rid)
        dispatched = True
    except Exception as e:  # the broker is down: the run is saved as queued and a worker re-sends it
        log.warning("job %s saved but not sent (%s); a worker's reconciler will send it", rid, e)
        dispatched = False
    return JobCreated(id=rid, status="queued", dispatched=dispatched, **_links(request, rid))


@router.get("/jobs", response_model=JobList)
def list_jobs(
    store: StoreDep,
    status: Annotated[list[Status] | None, Query(description="only these statuses (repeat to give several)")] = None,
    sort: Annotated[Literal["newest", "oldest", "accuracy"], Query(description="accuracy: best first")] = "newest",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobList:
    """The seed's Table 2 as a live table: each run's config key fields, status and best/final accuracy."""
    total, rows = job_table(store, list(status) if status else None, sort, limit, offset)
    return JobList(total=total, jobs=rows)


@router.get("/jobs/{run_id}", name="get_job", responses=NOT_FOUND)
def get_job(run_id: RunId, request: Request, store: StoreDep) -> dict[str, Any]:
    """The job's run.json (config, status, progress heartbeat, attempts, metrics, error) and its links."""
    run = store.read_run(run_id)
    links = {
        **_links(request, run_id),
        "metrics_url": str(request.url_for("job_metrics", run_id=run_id)),
        "curves_url": str(request.url_for("job_curves", run_id=run_id)),
    }
    return {**run, "cancel_requested": store.cancel_requested(run_id), "links": links}


@router.delete(
    "/jobs/{run_id}",
    response_model=CancelAnswer,
    responses={
        202: {"model": CancelAnswer, "description": "running: it stops at its next step"},
        401: AUTH_401,
        **NOT_FOUND,
        409: {"description": "the job already finished"},
    },
    dependencies=[WriteAccess],
)
def cancel_job(run_id: RunId, store: StoreDep, response: Response) -> CancelAnswer:
    """Cancel a queued job (200, cancelled now) or a running one (202: it stops at its next step)."""
    run = store.read_run(run_id)
    status = run["status"]
    if status in TERMINAL and status != "cancelled":  # cancelling a cancelled job again is a no-op
        raise HTTPException(409, f"job {run_id} already {status}; there is nothing to cancel")
    if status != "cancelled":
        store.request_cancel(run_id)  # the flag first: a worker taking the job now still sees it
        if status == "queued" and not (store.run_dir(run_id) / LEASE_FILE).exists():
            status = store.update_run(run_id, status="cancelled", finished=time.time())["status"]
        else:
            response.status_code = 202
    return CancelAnswer(id=run_id, status=status, cancel_requested=True)


@router.get("/jobs/{run_id}/metrics", response_model=MetricsPage, name="job_metrics", responses=NOT_FOUND)
def job_metrics(
    run_id: RunId,
    store: StoreDep,
    after_step: Annotated[int, Query(ge=-1, description="records with a larger step")] = -1,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    kind: Annotated[Kind | None, Query(description="only step, epoch or final records")] = None,
) -> MetricsPage:
    """The job's metrics history (for backfill before following /events)."""
    store.read_run(run_id)  # 404 for an unknown job
    return metrics_page(store, run_id, after_step, limit, kind)


@router.get(
    "/jobs/{run_id}/events",
    name="job_events_stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "server-sent events"},
        **NOT_FOUND,
        429: {"description": "this client already holds CONVLENS_MAX_SSE_PER_CLIENT open streams (Retry-After)"},
    },
)
async def job_events_stream(
    run_id: RunId,
    request: Request,
    store: StoreDep,
    last_event_id: Annotated[str | None, Header(description="resume after this event (set by EventSource)")] = None,
    after_step: Annotated[int | None, Query(ge=-1, description="start after this step (first connection)")] = None,
    heartbeat: Annotated[float, Query(ge=0.5, le=120, description="seconds between keepalive comments")] = 15.0,
    once: Annotated[
        bool, Query(description="send what is there now (records after the cursor, the status), then close")
    ] = False,
    timeout: Annotated[
        float | None, Query(gt=0, le=86_400, description="close the stream after this many seconds")
    ] = None,
) -> StreamingResponse:
    """Live progress as server-sent events: `step`/`epoch`/`final` records (id = step), `status`, then `end`.

    The stream stays open until the job ends (`end`), which for a queued job may be hours: a client that cannot
    wait asks with `once=true` (what is there now) or `timeout=S`, and reconnects with Last-Event-ID for more.
    One client (IP address) may hold CONVLENS_MAX_SSE_PER_CLIENT streams open at once; past that, 429.
    """
    store.read_run(run_id)  # 404 before the stream starts
    after = parse_event_id(last_event_id)
    if after is None and after_step is not None:
        after = (after_step, 99)
    limiter: StreamLimiter = request.app.state.sse_limiter
    client = request.client.host if request.client else "unknown"
    if not limiter.acquire(client):
        raise HTTPException(
            429,
            f"too many open event streams: {client} already holds {limiter.limit}, the most one client may hold "
            f"(CONVLENS_MAX_SSE_PER_CLIENT={limiter.limit}); close one, or raise that setting on the server",
            headers={"Retry-After": str(SSE_RETRY_AFTER_S)},
        )
    stop = getattr(request.app.state, "draining", None)  # set when the server shuts down
    wait = 0.0 if once else timeout
    until = None if wait is None else time.monotonic() + wait
    stream = job_events(store, run_id, after, heartbeat, 0.5, request.is_disconnected, stop, until)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return CountedStreamingResponse(
        stream, release=lambda: limiter.release(client), media_type="text/event-stream", headers=headers
    )


@router.get(
    "/jobs/{run_id}/curves.png",
    name="job_curves",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the seed's figures 1-4"}, **NOT_FOUND},
)
def job_curves(run_id: RunId, store: StoreDep) -> Response:
    """Train loss per step, eval accuracy per epoch, train vs eval accuracy, train vs eval loss."""
    run = store.read_run(run_id)
    png = render_curves(run_id, store.metrics(run_id).read(), run.get("status", "?"))
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})
