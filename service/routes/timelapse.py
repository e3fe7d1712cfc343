"""Routes: a job across training time. conv1's filters at any epoch (and their change), an animated GIF of them,
and the per-layer statistics of every epoch, read from the run store while the job runs and after it ended."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import matplotlib
import torch
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse, Response

from models import render
from models.runs import TERMINAL, RunStore
from models.timelapse import (
    STAT_LAYERS,
    STATS,
    Method,
    filters_gif,
    filters_image,
    frame_size,
    list_snapshots,
    load_snapshot,
)
from service.deps import StoreDep
from service.routes.jobs import RunId
from service.routes.visual import PNG_NPY_JSON, Format, ScaleQ

router = APIRouter(tags=["jobs"])

MAX_EPOCH = 100_000  # far past the config's 1000 epochs; bounds the number a client sends
MAX_GIF_PIXELS = 64_000_000  # all frames together: a GIF past this takes seconds to encode and tens of MB
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no job with that id, no snapshot for that epoch, or a run older than snapshots"},
    409: {"description": "the job has no snapshot yet (queued, or just starting)"},
    422: {"description": "epoch out of range (the detail gives the range), or a bad parameter"},
    503: {"description": "a snapshot file is unreadable (or was removed by a resume meanwhile: retry)"},
}
MethodQ = Annotated[
    Method,
    Query(description="channels: each filter per input channel, diverging red/blue map; rgb: the channels as colour"),
]
HEADERS = {"Cache-Control": "no-cache"}  # a running job adds epochs


def _snapshots(store: RunStore, run_id: str) -> dict[int, Path]:
    """The run's snapshots by epoch; 409 while an active job has none yet, 404 for a run that ended without any."""
    run = store.read_run(run_id)  # 404 for an unknown job
    snaps = list_snapshots(store.run_dir(run_id))
    if not snaps:
        _missing(store, run_id, run.get("status", "queued"), "conv1 snapshots")
    return snaps


def _missing(store: RunStore, run_id: str, status: str, what: str) -> NoReturn:
    """Raise the answer for a run without `what`: 409 while it may still come, else 404 saying why it never will."""
    if status not in TERMINAL:
        raise HTTPException(409, f"job {run_id} has no {what} yet ({status}); the first is written as training starts")
    if any(store.checkpoints_dir(run_id).glob("*.json")):
        raise HTTPException(404, f"run {run_id} predates {what}: it was trained before ConvLens recorded them")
    raise HTTPException(404, f"job {run_id} {status} before its first epoch ended: it has no {what}")


def _pick(snaps: dict[int, Path], epoch: int | None, run_id: str) -> int:
    """The asked epoch (default: the latest), or 404 giving the range (which epochs exist is the run's state)."""
    lo, hi = min(snaps), max(snaps)
    if epoch is None:
        return hi
    if not lo <= epoch <= hi:
        raise HTTPException(404, f"epoch {epoch} is out of range: job {run_id} has snapshots for epochs {lo}..{hi}")
    if epoch not in snaps:
        raise HTTPException(404, f"job {run_id} has no snapshot for epoch {epoch} ({len(snaps)} in {lo}..{hi})")
    return epoch


def _weights(snaps: dict[int, Path], epoch: int, diff: bool, run_id: str) -> torch.Tensor:
    """conv1 after `epoch`, or (diff) its change over that epoch."""
    w = load_snapshot(snaps[epoch])
    if not diff:
        return w
    if epoch - 1 not in snaps:
        later = [e for e in snaps if e - 1 in snaps]
        valid = f"epochs {later[0]}..{later[-1]}" if later else "none yet: it needs two snapshots"
        raise HTTPException(
            404,
            f"diff=1 is the change over an epoch: epoch {epoch} has no snapshot before it; {run_id} can diff {valid}",
        )
    return w - load_snapshot(snaps[epoch - 1])


def _run_vmax(snaps: dict[int, Path], diff: bool) -> float:
    """The largest max|W| over every snapshot (diff: over every epoch's change): one colour scale for the run."""
    ws = [load_snapshot(p) for p in snaps.values()]
    if diff:
        ws = [b - a for a, b in zip(ws, ws[1:], strict=False)] or ws
    return max(float(w.abs().max()) for w in ws)


@router.get(
    "/jobs/{run_id}/filters",
    name="job_filters",
    response_class=Response,
    responses={200: PNG_NPY_JSON, **ERRORS},
)
def job_filters(
    run_id: RunId,
    store: StoreDep,
    epoch: Annotated[
        int | None, Query(ge=0, le=MAX_EPOCH, description="0 = initialisation; default: the latest snapshot")
    ] = None,
    method: MethodQ = "channels",
    format: Annotated[Format, Query(description="png (the figure), json (values) or npy (float32)")] = "png",
    diff: Annotated[
        bool, Query(description="1: the change over that epoch (W[N] - W[N-1]), same diverging map")
    ] = False,
    colours: Annotated[
        Literal["epoch", "run"],
        Query(description="png: epoch scales colours by this picture's max|W|; run by the run's largest (as the GIF)"),
    ] = "epoch",
    scale: ScaleQ = None,
) -> Response:
    """conv1's filters of a job at one snapshot, as the seed's figures 5 and 6 (png) or the numbers."""
    snaps = _snapshots(store, run_id)
    n = _pick(snaps, epoch, run_id)
    w = _weights(snaps, n, diff, run_id)
    headers = {**HEADERS, "X-ConvLens-Epoch": str(n), "X-ConvLens-Epochs": f"{min(snaps)}-{max(snaps)}"}
    if format == "npy":
        headers["Content-Disposition"] = f'attachment; filename="{run_id}-conv1-epoch-{n}{"-diff" if diff else ""}.npy"'
        return Response(render.npy_bytes(w), media_type="application/octet-stream", headers=headers)
    if format == "json":
        info = {"id": run_id, "layer": "conv1", "epoch": n, "epochs": sorted(snaps), "diff": diff}
        return JSONResponse({**info, "max_abs": float(w.abs().max()), **render.tensor_json(w)}, headers=headers)
    if colours == "run":
        png = render.png_bytes(filters_image(w, method, _run_vmax(snaps, diff), scale))
    elif method == "rgb":
        png = render.filters_rgb_png(w, scale)
    else:
        png = render.filters_channels_png(w, None, scale)
    return Response(png, media_type="image/png", headers=headers)


@router.get(
    "/jobs/{run_id}/filters.gif",
    name="job_filters_gif",
    response_class=Response,
    responses={200: {"content": {"image/gif": {}}, "description": "one frame a snapshot"}, **ERRORS},
)
def job_filters_gif(
    run_id: RunId,
    store: StoreDep,
    method: MethodQ = "channels",
    scale: Annotated[int | None, Query(ge=1, le=8, description="upscale per filter; default: ~32 px tiles")] = None,
    max_frames: Annotated[int, Query(ge=2, le=1001, description="more snapshots: evenly spaced, both ends kept")] = 200,
    duration_ms: Annotated[int, Query(ge=20, le=10_000, description="milliseconds a frame")] = 400,
) -> Response:
    """conv1 across every snapshot so far, one frame an epoch labelled with it, on one colour scale."""
    snaps = _snapshots(store, run_id)
    epochs = list(snaps)
    if len(epochs) > max_frames:
        epochs = [epochs[round(i * (len(epochs) - 1) / (max_frames - 1))] for i in range(max_frames)]
    first = load_snapshot(snaps[epochs[0]])
    h, w = frame_size(first.shape, method, scale)
    if h * w * len(epochs) > MAX_GIF_PIXELS:
        raise HTTPException(
            422,
            f"{len(epochs)} frames of {w}x{h} pixels is over the limit of {MAX_GIF_PIXELS:,} pixels; "
            "ask for fewer frames (max_frames) or a smaller scale",
        )
    gif = filters_gif([(e, load_snapshot(snaps[e])) for e in epochs], method, scale, duration_ms)
    headers = {**HEADERS, "X-ConvLens-Frames": str(len(epochs)), "X-ConvLens-Epochs": f"{epochs[0]}-{epochs[-1]}"}
    return Response(gif, media_type="image/gif", headers=headers)


def _layer_records(store: RunStore, run_id: str) -> tuple[str, list[dict[str, Any]]]:
    """The run's status and its `layers` records, one an epoch in epoch order; 404 for a run that never had any."""
    status = str(store.read_run(run_id).get("status", "queued"))
    by_epoch = {int(r["epoch"]): r for r in _layers_lines(store.run_dir(run_id) / "metrics.jsonl")}
    if not by_epoch and status in TERMINAL:
        _missing(store, run_id, status, "layer statistics")
    keys = ("epoch", "step", "layers", "dead_by_relu", "seconds")
    return status, [{k: by_epoch[e].get(k) for k in keys} for e in sorted(by_epoch)]


def _layers_lines(path: Path) -> list[dict[str, Any]]:
    """The `layers` records of a metrics.jsonl, parsing no other line (a long run has thousands of steps)."""
    out = []
    with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
        for line in f:
            if b'"kind": "layers"' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:  # a line being written: the next request reads it whole
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


@router.get("/jobs/{run_id}/layers", name="job_layers", responses=ERRORS)
def job_layers(run_id: RunId, store: StoreDep) -> dict[str, Any]:
    """Per epoch, per named layer: weight norm, mean gradient norm, update/weight ratio, dead units, mean output.

    Epoch 0 is the initialisation (no gradient or update yet); fc has no ReLU, so no dead fraction; `seconds` is
    what measuring (and the snapshot) cost that epoch. An active job's list grows an entry an epoch (empty until
    its first epoch ends).
    """
    status, epochs = _layer_records(store, run_id)
    return {"id": run_id, "status": status, "layers": list(STAT_LAYERS), "stats": list(STATS), "epochs": epochs}


@router.get(
    "/jobs/{run_id}/layers.png",
    name="job_layers_png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "one panel a statistic, one line a layer"}, **ERRORS},
)
def job_layers_png(run_id: RunId, store: StoreDep) -> Response:
    """The layer statistics as small multiples: one panel a statistic, one line a layer, epochs across."""
    status, epochs = _layer_records(store, run_id)
    return Response(_layers_png(run_id, status, epochs), media_type="image/png", headers=HEADERS)


def _layers_png(run_id: str, status: str, epochs: list[dict[str, Any]]) -> bytes:
    """Five panels (a statistic each) and a legend; norms and ratios on a log scale."""
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # Figure, not pyplot: no global state shared by requests in the thread pool.
    fig = Figure(figsize=(12, 6.5), dpi=100, layout="constrained")
    fig.suptitle(f"run {run_id} ({status}): layer statistics per epoch")
    axes = fig.subplots(2, 3).flatten()
    titles = {
        "weight_norm": "weight norm",
        "grad_norm": "gradient norm (mean of logged steps)",
        "update_ratio": "update / weight (per epoch)",
        "dead": "dead units (probe batch)",
        "act_mean": "mean output (probe batch)",
    }
    for ax, stat in zip(axes, STATS, strict=False):
        ax.set(title=titles[stat], xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for layer in STAT_LAYERS:
            pts = [(r["epoch"], r["layers"][layer][stat]) for r in epochs if stat in r["layers"].get(layer, {})]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=layer)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif stat in ("weight_norm", "grad_norm", "update_ratio"):
            ax.set_yscale("log")
    handles, labels = next(((a.get_legend_handles_labels()) for a in axes if a.lines), ([], []))
    axes[-1].axis("off")
    if handles:
        axes[-1].legend(handles, labels, loc="center", title="layer")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
