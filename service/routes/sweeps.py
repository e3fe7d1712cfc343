"""Routes: sweeps. POST /sweeps plans every row (nothing is queued unless all are valid), then queues each like
POST /train; the table, its figures and cancel read and reuse the jobs' run store and cancel."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from jobqueue.app import send_train
from jobqueue.contract import TERMINAL
from models.runs import RunNotFound
from models.sweep import (
    SWEEP_ID_RE,
    SweepInvalid,
    SweepSpec,
    SweepStore,
    new_sweep_id,
    plan,
    row_run_id,
    sweep_record,
)
from service.auth import AUTH_401, WriteAccess
from service.deps import StoreDep
from service.routes.jobs import SenderDep, cancel_job
from service.sweeps_view import (
    SweepCancel,
    SweepCreated,
    SweepList,
    SweepSummary,
    SweepTable,
    curves_png,
    sweep_table,
    table_png,
)

log = logging.getLogger("convlens.sweeps")
router = APIRouter(tags=["sweeps"])

SweepId = Annotated[str, Path(pattern=SWEEP_ID_RE.pattern, description="a sweep id: 1-60 letters, digits, '-' or '_'")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no sweep with that id"}}
PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}}, **NOT_FOUND}


def _sweeps(store: StoreDep) -> SweepStore:
    return SweepStore(store.home)


@router.post(
    "/sweeps",
    status_code=202,
    response_model=SweepCreated,
    responses={
        400: {"description": "the body is not JSON text (e.g. not UTF-8)"},
        401: AUTH_401,
        409: {"description": "the sweep id, or one of its rows' run ids, already exists"},
        422: {"description": "a field, value or row that fails validation (each named by row and field)"},
    },
    dependencies=[WriteAccess],
)
def create_sweep(spec: SweepSpec, request: Request, store: StoreDep, sender: SenderDep) -> Any:
    """Queue one training job per row: the grid's combinations (times `rows`, or a preset's rows), at most 64."""
    try:
        rows = plan(spec)
    except SweepInvalid as e:
        return JSONResponse({"detail": jsonable_encoder(e.errors)}, status_code=422)
    sweeps = _sweeps(store)
    sid = spec.id or new_sweep_id()
    run_ids = [row_run_id(sid, i) for i in range(len(rows))]
    taken = [r for r in run_ids if store.exists(r)]
    if sweeps.exists(sid):
        raise HTTPException(409, f"sweep {sid!r} already exists; choose another id")
    if taken:
        raise HTTPException(409, f"runs {', '.join(taken[:3])} already exist; choose another sweep id")
    # The record first: a sweep interrupted while its rows are written still lists them (as missing, or queued).
    sweeps.write(sweep_record(sid, spec, rows))
    queue = sender.conf.task_default_queue
    for rid, row in zip(run_ids, rows, strict=True):
        store.create_run(row.config.model_dump(), run_id=rid)
        store.update_run(rid, queue=queue, sweep=sid)  # `queue`: the reconciler owns it, as for POST /train
    dispatched = True
    for rid in run_ids:
        try:
            send_train(sender, rid)
        except Exception as e:  # the broker is down: every row is saved as queued and a reconciler sends it
            log.warning("sweep %s saved but not all sent (%s); a worker's reconciler will send the rest", sid, e)
            dispatched = False
            break
    url = str(request.url_for("get_sweep", sweep_id=sid))
    return SweepCreated(id=sid, run_ids=run_ids, dispatched=dispatched, status_url=url)


@router.get("/sweeps", response_model=SweepList)
def list_sweeps(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> SweepList:
    """Every sweep, newest first, with its rows counted by status."""
    records = _sweeps(store).list()
    out = []
    for record in records[offset : offset + limit]:
        t = sweep_table(store, record)
        out.append(SweepSummary(**t.model_dump(exclude={"rows"})))
    return SweepList(total=len(records), sweeps=out)


@router.get("/sweeps/{sweep_id}", name="get_sweep", response_model=SweepTable, responses=NOT_FOUND)
def get_sweep(sweep_id: SweepId, store: StoreDep) -> SweepTable:
    """The table: the fields that vary, status, progress, best val accuracy (epoch), final test and train
    accuracy, wall time and worker of every row."""
    return sweep_table(store, _sweeps(store).read(sweep_id))


@router.get("/sweeps/{sweep_id}/table.png", response_class=Response, responses=PNG)
def sweep_table_png(sweep_id: SweepId, store: StoreDep) -> Response:
    """The table as an image (with the reported accuracies of a preset's rows beside the measured ones)."""
    png = table_png(sweep_table(store, _sweeps(store).read(sweep_id)))
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.get("/sweeps/{sweep_id}/curves.png", response_class=Response, responses=PNG)
def sweep_curves_png(sweep_id: SweepId, store: StoreDep) -> Response:
    """Every row's validation accuracy per epoch on one plot."""
    table = sweep_table(store, _sweeps(store).read(sweep_id))
    epochs = {r.id: store.metrics(r.id).read() for r in table.rows if r.status != "missing"}
    epochs = {k: [r for r in v if r.get("kind") == "epoch"] for k, v in epochs.items()}
    return Response(curves_png(table, epochs), media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.delete(
    "/sweeps/{sweep_id}",
    response_model=SweepCancel,
    responses={
        202: {"model": SweepCancel, "description": "some rows were running: they stop at their next step"},
        401: AUTH_401,
        **NOT_FOUND,
    },
    dependencies=[WriteAccess],
)
def cancel_sweep(sweep_id: SweepId, store: StoreDep, response: Response) -> SweepCancel:
    """Cancel every row still queued (cancelled now) or running (202: they stop at their next step)."""
    record = _sweeps(store).read(sweep_id)
    out = SweepCancel(id=sweep_id, cancelled=[], stopping=[], finished=[])
    for entry in record.get("runs") or []:
        rid = entry["id"]
        try:
            status = store.read_run(rid)["status"]
            if status in TERMINAL:
                (out.cancelled if status == "cancelled" else out.finished).append(rid)
                continue
            answer = Response()
            cancelled = cancel_job(rid, store, answer)  # the jobs' own cancel: flag, then cancel if unleased
        except (RunNotFound, HTTPException):  # gone, or finished between the read and the cancel
            out.finished.append(rid)
            continue
        (out.stopping if answer.status_code == 202 else out.cancelled).append(cancelled.id)
    if out.stopping:
        response.status_code = 202
    return out
