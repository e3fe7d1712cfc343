"""What the job routes return: schemas, the live Table 2 rows, metrics pages (no HTTP here)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.runs import RunStatus, RunStore

Status = RunStatus
Kind = Literal["step", "epoch", "final", "layers"]
# The config's columns of the seed's Table 2 (batch, milestones, gamma, preprocessing), and what else varies.
TABLE_FIELDS = (
    "arch",
    "dataset",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "schedule",
    "milestones",
    "gamma",
    "crop",
    "flip",
    "weight_decay",
    "label_smoothing",
    "train_limit",
    "val_size",
    "seed",
)


class JobCreated(BaseModel):
    """POST /train's answer: where to follow the job."""

    id: str
    status: Status
    status_url: str
    events_url: str
    dispatched: bool = Field(description="sent to the broker now; if false, a worker's reconciler sends it later")


class JobRow(BaseModel):
    """One run as a row of the live Table 2."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: Status
    created: float | None = None
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    epoch: int | None = Field(None, description="last epoch reported")
    step: int | None = None
    total_steps: int | None = None
    config: dict[str, Any] = Field(default_factory=dict, description="the config's key fields")
    best_val_acc: float | None = Field(None, description="best accuracy on the validation split (or test if none)")
    best_epoch: int | None = None
    test_acc: float | None = Field(None, description="test accuracy of the best checkpoint (at the end)")
    final_test_acc: float | None = Field(None, description="test accuracy of the last epoch's weights")
    accuracy: float | None = Field(None, description="test_acc when finished, else best_val_acc: the sort key")
    error: str | None = None
    cancel_requested: bool = False


class JobList(BaseModel):
    """A page of the table."""

    total: int
    jobs: list[JobRow]


class MetricsPage(BaseModel):
    """metrics.jsonl records with step > after_step; pass next_after_step to get the next page."""

    id: str
    records: list[dict[str, Any]]
    next_after_step: int
    has_more: bool


class CancelAnswer(BaseModel):
    """DELETE /jobs/{id}: the status now; a running job stops at its next step."""

    id: str
    status: Status
    cancel_requested: bool


_cache: dict[Path, tuple[tuple[int, int, int], dict[str, Any]]] = {}
_cache_lock = threading.Lock()
_CACHE_MAX = 4096


def epoch_summary(path: Path) -> dict[str, Any]:
    """Best evaluation accuracy (and epoch) over a run's epoch records, and the last epoch's train accuracy;
    cached until metrics.jsonl changes."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    with _cache_lock:
        hit = _cache.get(path)
    if hit and hit[0] == key:
        return hit[1]
    best: dict[str, Any] = {}
    with path.open("rb") as f:
        for line in f:
            if b'"kind": "epoch"' not in line:  # skip step records without parsing them
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            acc = rec.get("val_acc", rec.get("test_acc"))
            if isinstance(acc, int | float) and acc > best.get("best_val_acc", -1.0):
                best |= {"best_val_acc": float(acc), "best_epoch": rec.get("epoch")}
            best["last_train_acc"] = rec.get("train_acc")  # the last epoch's (a sweep's table shows it)
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[path] = (key, best)
    return best


def job_row(store: RunStore, run: dict[str, Any]) -> JobRow:
    """A run.json as a table row (epoch accuracies from metrics.jsonl)."""
    rid = run["id"]
    cfg = run.get("config") or {}
    progress, metrics = run.get("progress") or {}, run.get("metrics") or {}
    summary = epoch_summary(store.run_dir(rid) / "metrics.jsonl")
    test_acc, final = metrics.get("test_acc"), metrics.get("final_test_acc")
    return JobRow(
        id=rid,
        status=run.get("status", "queued"),
        created=run.get("created"),
        started=run.get("started"),
        finished=run.get("finished"),
        attempts=int(run.get("attempts") or 0),
        epoch=progress.get("epoch"),
        step=progress.get("step"),
        total_steps=progress.get("total_steps"),
        config={k: cfg.get(k) for k in TABLE_FIELDS if k in cfg},
        best_val_acc=summary.get("best_val_acc"),
        best_epoch=run.get("best_epoch") or summary.get("best_epoch"),
        test_acc=test_acc,
        final_test_acc=final,
        accuracy=test_acc if test_acc is not None else summary.get("best_val_acc"),
        error=run.get("error"),
        cancel_requested=store.cancel_requested(rid),
    )


def job_table(
    store: RunStore, status: list[str] | None, sort: str, limit: int, offset: int
) -> tuple[int, list[JobRow]]:
    """Runs filtered by status and sorted (newest, oldest, or accuracy high to low, unknown last)."""
    runs = [r for r in store.list_runs() if not status or r.get("status") in status]
    if sort == "oldest":
        runs.reverse()
    rows = [job_row(store, r) for r in runs] if sort == "accuracy" else None
    if rows is not None:
        rows.sort(key=lambda r: (r.accuracy is None, -(r.accuracy or 0.0)))
        return len(rows), rows[offset : offset + limit]
    return len(runs), [job_row(store, r) for r in runs[offset : offset + limit]]


def metrics_page(store: RunStore, run_id: str, after_step: int, limit: int, kind: str | None) -> MetricsPage:
    """Up to `limit` records after `after_step`, never splitting the records of one step across pages."""
    records = [r for r in store.metrics(run_id).read(after_step) if kind is None or r.get("kind") == kind]
    page = records[:limit]
    while len(page) < len(records) and records[len(page)].get("step") == page[-1].get("step"):
        page.append(records[len(page)])  # an epoch/final record shares its step with the step record before
    last = int(page[-1].get("step", after_step)) if page else after_step
    return MetricsPage(id=run_id, records=page, next_after_step=last, has_more=len(page) < len(records))
