"""What the sweep routes return: schemas, the sweep's table (one row per run), its two figures (no HTTP here)."""

from __future__ import annotations

import io
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here; set before anything imports pyplot
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from models.runs import RunNotFound, RunStore  # noqa: E402
from service.jobs_view import epoch_summary, job_row  # noqa: E402


class SweepCreated(BaseModel):
    """POST /sweeps' answer: the sweep, its rows' run ids, and where to follow it."""

    id: str
    run_ids: list[str]
    dispatched: bool = Field(description="every row sent to the broker now; if false a worker's reconciler sends it")
    status_url: str


class SweepRow(BaseModel):
    """One run of a sweep as a row of its table."""

    id: str
    index: int
    values: dict[str, Any] = Field(description="the fields this row sets on top of the base")
    status: str
    progress: float = Field(description="0..1: steps done of the run's total")
    epoch: int | None = None
    step: int | None = None
    total_steps: int | None = None
    attempts: int = 0
    best_val_acc: float | None = Field(None, description="best validation accuracy (test if none held out)")
    best_epoch: int | None = None
    test_acc: float | None = Field(None, description="test accuracy of the best checkpoint")
    final_test_acc: float | None = Field(None, description="test accuracy of the last epoch's weights")
    train_acc: float | None = Field(None, description="training accuracy of the last epoch")
    wall_s: float | None = Field(
        None, description="first start to end (now while running; a row handed back to the queue: until then)"
    )
    worker: str | None = Field(None, description="the Celery node that ran (or runs) it")
    reference: dict[str, float] | None = Field(None, description="accuracies reported for this row (a preset's)")
    error: str | None = None
    cancel_requested: bool = False


class SweepTable(BaseModel):
    """A sweep: its varying fields, how far it is, and its rows."""

    id: str
    created: float
    preset: str | None = None
    varying: list[str]
    total: int
    counts: dict[str, int] = Field(description="rows per status")
    progress: float = Field(description="0..1 over all rows")
    rows: list[SweepRow]


class SweepSummary(BaseModel):
    """One sweep in GET /sweeps."""

    id: str
    created: float
    preset: str | None = None
    varying: list[str]
    total: int
    counts: dict[str, int]
    progress: float


class SweepList(BaseModel):
    total: int
    sweeps: list[SweepSummary]


class SweepCancel(BaseModel):
    """DELETE /sweeps/{id}: rows cancelled now, rows that stop at their next step, rows already finished."""

    id: str
    cancelled: list[str]
    stopping: list[str]
    finished: list[str]


def sweep_row(store: RunStore, index: int, entry: dict[str, Any]) -> SweepRow:
    """A sweep's row from its run's run.json and metrics (status `missing` if the run folder is gone)."""
    rid = entry["id"]
    base = {"id": rid, "index": index, "values": entry.get("values") or {}, "reference": entry.get("reference")}
    try:
        run = store.read_run(rid)
    except RunNotFound:
        return SweepRow(**base, status="missing", progress=0.0)
    row = job_row(store, run)
    progress = run.get("progress") or {}
    step, total = progress.get("step"), progress.get("total_steps")
    done = 1.0 if row.status == "succeeded" else (min(1.0, step / total) if step and total else 0.0)
    started, finished = run.get("started"), run.get("finished")
    # A row handed back to the queue (a worker stopped) is not running: its clock stopped when it was handed back.
    end = finished or (time.time() if row.status == "running" else run.get("updated") or time.time())
    wall = end - started if started else None
    return SweepRow(
        **base,
        status=row.status,
        progress=round(done, 4),
        epoch=row.epoch,
        step=row.step,
        total_steps=row.total_steps,
        attempts=row.attempts,
        best_val_acc=row.best_val_acc,
        best_epoch=row.best_epoch,
        test_acc=row.test_acc,
        final_test_acc=row.final_test_acc,
        train_acc=epoch_summary(store.run_dir(rid) / "metrics.jsonl").get("last_train_acc"),
        wall_s=None if wall is None else round(wall, 2),
        worker=(run.get("worker") or {}).get("node"),
        error=row.error,
        cancel_requested=row.cancel_requested,
    )


def sweep_table(store: RunStore, record: dict[str, Any]) -> SweepTable:
    """The whole table of a sweep record."""
    rows = [sweep_row(store, i, e) for i, e in enumerate(record.get("runs") or [])]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return SweepTable(
        id=record["id"],
        created=record.get("created", 0.0),
        preset=record.get("preset"),
        varying=record.get("varying") or [],
        total=len(rows),
        counts=counts,
        progress=round(sum(r.progress for r in rows) / max(len(rows), 1), 4),
        rows=rows,
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return "-" if v is None else str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def row_label(row: SweepRow) -> str:
    return f"{row.index:02d} " + " ".join(f"{k}={_fmt(v)}" for k, v in row.values.items())


def table_png(table: SweepTable) -> bytes:
    """The table as an image: the varying fields, status, best val (epoch), test, train, the reference, worker."""
    has_ref = any(r.reference for r in table.rows)
    head = ["#", *table.varying, "status", "best val % (ep)", "test %", "train %"]
    head += ["reported test %", "reported train %"] if has_ref else []
    head += ["wall s", "worker"]
    cells = []
    for r in table.rows:
        best = f"{_pct(r.best_val_acc)} ({_fmt(r.best_epoch)})" if r.best_val_acc is not None else "-"
        line = [f"{r.index:02d}", *(_fmt(r.values.get(k)) for k in table.varying), r.status, best]
        line += [_pct(r.test_acc), _pct(r.train_acc)]
        ref = r.reference or {}
        line += [_pct(ref.get("test_acc")), _pct(ref.get("train_acc"))] if has_ref else []
        line += [_fmt(None if r.wall_s is None else round(r.wall_s)), (r.worker or "-")[:24]]
        cells.append(line)
    fig = Figure(figsize=(max(8, 1.15 * len(head)), 1.2 + 0.32 * max(len(cells), 1)), dpi=100)
    ax = fig.subplots()
    ax.axis("off")
    counts = ", ".join(f"{n} {status}" for status, n in table.counts.items())
    ax.set_title(f"sweep {table.id}: {counts} ({100 * table.progress:.0f}%)", fontsize=10)
    if cells:
        t = ax.table(cellText=cells, colLabels=head, loc="center", cellLoc="center")
        t.auto_set_font_size(False)
        t.set_fontsize(8)
        t.auto_set_column_width(list(range(len(head))))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def curves_png(table: SweepTable, epochs: dict[str, list[dict[str, Any]]]) -> bytes:
    """Every row's validation (or test) accuracy per epoch on one plot; `epochs`: run id -> its epoch records."""
    fig = Figure(figsize=(11, 6.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.set(title=f"sweep {table.id}: accuracy per epoch", xlabel="epoch", ylabel="accuracy")
    drawn = 0
    for row in table.rows:
        recs = epochs.get(row.id) or []
        ev = "val" if any("val_acc" in r for r in recs) else "test"
        pts = [(r["epoch"], r[f"{ev}_acc"]) for r in recs if f"{ev}_acc" in r]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=f"{row_label(row)} ({ev}, {row.status})")
            drawn += 1
    if drawn:
        ax.legend(fontsize=7, loc="lower right")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.text(0.5, 0.5, "no epoch finished yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
