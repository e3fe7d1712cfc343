"""Routes: two models compared on the same images (GET /compare), computed once per pair of weight hashes.

The answer is cached in the run store at `<home>/compare/<sha a>-<sha b>-<split>.{json,png}` (the first 16 hex
digits of each model's weights hash), so a retrained model under the same id is compared anew, and every API
process reads what one of them computed.

The first request for a pair runs the whole split through both models: minutes on a CPU for a test set. So it
starts in the background, on its own thread (as /topk's index and large /visualize requests do, with the same
`Build` progress record), and the request answers 202 with the progress and `eta_s` until the report is written;
then 200. Identical requests (json or png, any ids naming the same weights) join one computation in this process,
and other API processes wait on its lock (flock) and then read what it wrote.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from models.atomic import atomic_write_bytes, atomic_write_json
from models.compare import compare_png, compare_predictions, match_filters, predict_labels
from models.data import ArrayDataset, load_cifar
from models.errors import ConvLensError, InvalidArgument
from models.runs import RUN_ID_RE
from models.visual import filters
from service.deps import RegistryDep
from service.registry import LoadedModel, ModelRegistry, validate_model_id
from service.topk import Build, build_lock, examples_split

log = logging.getLogger("convlens.compare")
router = APIRouter(tags=["models"])

Split = Literal["val", "test"]
CHUNK = 500  # images resized and predicted at a time (and the unit of progress)
# In each cached report's name: raised when the computation changes, so no report of an older one is served
# (2: inputs normalised before resizing, as /predict and training make them).
REPORT_VERSION = 2
RETRY_AFTER_S = 2
MAX_RUNNING = 2  # comparisons computing at once in one API process; more answer 429 + Retry-After
# The grammar of models=, from the one id rule (models.runs): the OpenAPI schema states it, so a client (or a
# schema fuzzer) can build values the parser accepts, and the parser checks exactly it.
_ID = RUN_ID_RE.pattern.removeprefix("^").removesuffix("$")
PAIR_RE = re.compile(rf"^({_ID}),({_ID})$")

_png_locks: dict[Path, threading.Lock] = {}
_png_locks_guard = threading.Lock()


class Stopped(Exception):
    """Raised from a comparison's progress callback when the process exits: a thread killed inside torch aborts
    the process, so it ends between two chunks instead."""


_EXITING = threading.Event()
_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


@atexit.register
def _stop_comparisons() -> None:
    _EXITING.set()
    for thread in list(_THREADS):
        thread.join(10)


@dataclass
class Comparison(Build):
    """A comparison in progress (Build's progress and ETA) and, once it ends, its report or its error."""

    ids: tuple[str, str] = ("", "")
    split: str = "val"
    done: threading.Event = field(default_factory=threading.Event)
    report: dict[str, Any] | None = None
    exc: ConvLensError | None = None

    def advance(self, frac: float) -> None:
        self.progress = frac
        if _EXITING.is_set():
            raise Stopped

    def as_json(self) -> dict[str, Any]:
        out = super().as_json()
        out.update(models={"a": self.ids[0], "b": self.ids[1]}, split=self.split)
        if self.error is None:  # Build's own sentence speaks of a top-k index
            a, b = self.ids
            out["detail"] = f"comparing {a} and {b} on the {self.split} split ({self.progress:.0%}); retry shortly"
        return out


class CompareProgress(BaseModel):
    """GET /compare's 202: the comparison is being computed; ask again (the same URL) after Retry-After."""

    status: Literal["building", "failed"]
    model: str = Field(description="the pair as asked: a,b")
    models: dict[str, str]
    split: str
    progress: float = Field(description="0..1")
    elapsed_s: float
    eta_s: float | None = Field(description="seconds left, estimated from the progress so far")
    detail: str


def parse_pair(models: str) -> tuple[str, str]:
    """`a,b` -> (a, b); 422 naming what is wrong otherwise (a bad id by the id rule's own message)."""
    m = PAIR_RE.fullmatch(models)
    if m is not None:
        return m.group(1), m.group(2)
    parts = models.split(",")
    if len(parts) == 2 and all(parts):
        validate_model_id(parts[0])  # raises InvalidArgument (422) naming the bad id and the rule
        validate_model_id(parts[1])
    raise HTTPException(422, f"models= takes exactly two model ids separated by a comma, got {models[:200]!r}")


def _held_out(meta_a: dict[str, Any], meta_b: dict[str, Any], ids: tuple[str, str]) -> int:
    """How many of the last training images both models held out (the smaller of their val_size)."""
    held = [examples_split(meta)[1] for meta in (meta_a, meta_b)]
    for mid, n in zip(ids, held, strict=True):
        if n <= 0:
            raise InvalidArgument(f"model {mid} held out no validation images (val_size 0); use split=test")
    return min(held)


def _images(data_root: Path, a: LoadedModel, b: LoadedModel, split: Split) -> tuple[ArrayDataset, str]:
    """The test set, or the last training images both models held out."""
    dataset = str(a.meta.get("dataset", "cifar10"))
    if split == "test":
        return load_cifar(data_root, dataset, train=False), f"{dataset} test"
    n = _held_out(a.meta, b.meta, (a.id, b.id))
    full = load_cifar(data_root, dataset, train=True)
    return full.subset(len(full) - n), f"{dataset} validation (last {n} training images)"


def _conv1(loaded: LoadedModel) -> torch.Tensor:
    return filters(loaded.model, "conv1")


def _predict(m: LoadedModel, images: torch.Tensor, tick: Callable[[], None]) -> torch.Tensor:
    """Predicted classes, resized to the model's input size a chunk at a time (a 224-pixel model would otherwise
    hold the whole split upsampled: 1.5 GB for CIFAR's test set); `tick` after each chunk."""
    size = int(m.meta.get("input_size", 32))
    out = []
    for i in range(0, images.shape[0], CHUNK):
        out.append(predict_labels(m.model, images[i : i + CHUNK], m.meta["mean"], m.meta["std"], input_size=size))
        tick()
    return torch.cat(out)


def compute(
    data_root: Path, a: LoadedModel, b: LoadedModel, split: Split, progress: Callable[[float], None] | None = None
) -> dict[str, Any]:
    """The comparison of two loaded models on one split (JSON-ready); `progress(0..1)` after each chunk."""
    ds, described = _images(data_root, a, b, split)
    same = a.meta.get("sha256") is not None and a.meta.get("sha256") == b.meta.get("sha256")
    chunks = -(-ds.images.shape[0] // CHUNK) * (1 if same else 2)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done / max(chunks, 1), 0.99))  # 1.0 is the report written, not the last chunk

    first = _predict(a, ds.images, tick)
    preds = [first, first if same else _predict(b, ds.images, tick)]  # a model with itself: predict once
    report = compare_predictions(ds.labels, preds[0], preds[1], a.classes)
    wa, wb = _conv1(a), _conv1(b)
    try:
        report["filters"] = match_filters(wa, wb)
    except InvalidArgument as e:  # different stems (7x7 vs 3x3): the predictions still compare
        report["filters"] = {"note": str(e)}
    report.update(
        split=described,
        dataset=a.meta.get("dataset"),
        sha256={"a": a.meta.get("sha256"), "b": b.meta.get("sha256")},
    )
    return report


def _cache_stem(home: Path, meta_a: dict[str, Any], meta_b: dict[str, Any], split: Split) -> Path | None:
    sha = [str(m.get("sha256") or "") for m in (meta_a, meta_b)]
    if not all(sha):
        return None  # a checkpoint without a recorded hash: nothing safe to key a cache on
    return home / "compare" / f"v{REPORT_VERSION}-{sha[0][:16]}-{sha[1][:16]}-{split}"


def read_report(stem: Path) -> dict[str, Any] | None:
    """A cached report, or None (none yet, or damaged: then it is computed again)."""
    try:
        report = json.loads(stem.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


class CompareService:
    """Starts each distinct comparison once, in the background, and hands out its progress, report or error."""

    def __init__(self, home: Path, data_root: Path) -> None:
        self.home, self.data_root = Path(home), Path(data_root)
        self._lock = threading.Lock()
        self._jobs: dict[Path, Comparison] = {}
        self.computed = 0  # comparisons this process computed (a cached report or a joined one adds none)

    def get(
        self, registry: ModelRegistry, ids: tuple[str, str], split: Split, stem: Path | None
    ) -> dict[str, Any] | Comparison:
        """The cached report, or the (new or joined) comparison; a finished one that is not cached (a failure, or
        a pair without hashes) is handed out once, and the next request starts again."""
        key = stem or self.home / "compare" / f"unhashed-{ids[0]}-{ids[1]}-{split}"
        with self._lock:
            job = self._jobs.get(key)
            if job is not None:
                if job.done.is_set():
                    del self._jobs[key]
                return job
            report = read_report(stem) if stem is not None else None
            if report is not None:
                return report
            if sum(not j.done.is_set() for j in self._jobs.values()) >= MAX_RUNNING:
                raise HTTPException(
                    429,
                    f"{MAX_RUNNING} comparisons are being computed, the most one server runs at once; retry shortly "
                    "(or ask for one already computed)",
                    headers={"Retry-After": str(RETRY_AFTER_S * 5)},
                )
            job = Comparison(f"{ids[0]},{ids[1]}", ids=ids, split=split)
            thread = job.thread = threading.Thread(
                target=self._run, args=(registry, job, key, stem), name=f"compare-{ids[0]}-{ids[1]}", daemon=True
            )
            self._jobs[key] = job
            _THREADS.add(thread)
        thread.start()
        return job

    def forget(self, job: Comparison) -> None:
        """A finished comparison's failure has been reported: the next request starts it again."""
        with self._lock:
            for key, known in list(self._jobs.items()):
                if known is job:
                    del self._jobs[key]

    def _run(self, registry: ModelRegistry, job: Comparison, key: Path, stem: Path | None) -> None:
        try:
            with build_lock(stem) if stem is not None else contextlib.nullcontext():
                report = read_report(stem) if stem is not None else None  # another process computed it meanwhile
                if report is None:
                    a, b = registry.get(job.ids[0]), registry.get(job.ids[1])
                    with self._lock:
                        self.computed += 1
                    report = compute(self.data_root, a, b, job.split, job.advance)  # type: ignore[arg-type]
                    if stem is not None:
                        atomic_write_json(stem.with_suffix(".json"), report)
            job.report, job.progress = report, 1.0
            if stem is not None:
                with self._lock:
                    self._jobs.pop(key, None)  # from now on the run store answers
        except Stopped:
            job.error = "stopped: the server is exiting; ask again"
        except ConvLensError as e:  # e.g. the dataset is missing (503), the checkpoint cannot load (503)
            job.exc, job.error = e, str(e)
        except Exception as e:  # a bug must not leave requests polling a comparison that never ends
            job.error = f"comparing {job.ids[0]} and {job.ids[1]} failed: {type(e).__name__}: {e}"
            log.exception("comparing %s and %s failed", *job.ids)
        finally:
            job.done.set()


def compare_service(request: Request) -> CompareService:
    svc: CompareService | None = getattr(request.app.state, "compare", None)
    if svc is None:
        settings = request.app.state.settings
        svc = request.app.state.compare = CompareService(settings.home, settings.data_root)
    return svc


def _png_lock(path: Path) -> threading.Lock:
    with _png_locks_guard:
        return _png_locks.setdefault(path, threading.Lock())


def _png(registry: ModelRegistry, report: dict[str, Any], stem: Path | None) -> bytes:
    """The figure, drawn once per pair of ids (its titles name them) and kept beside the cached report."""
    a, b = report["models"]["a"], report["models"]["b"]
    path = stem.with_suffix(f".{a}.{b}.png") if stem is not None else None
    with _png_lock(path) if path is not None else contextlib.nullcontext():
        if path is not None and path.is_file():
            return path.read_bytes()
        png = compare_png(report, _conv1(registry.get(a)), _conv1(registry.get(b)))
        if path is not None:
            atomic_write_bytes(path, png)
    return png


def _pending(svc: CompareService, job: Comparison) -> Response:
    """A comparison not (successfully) done: 202 while it runs, its error once it failed (reported once)."""
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if not job.done.is_set():
        return JSONResponse(job.as_json(), status_code=202, headers=retry)
    svc.forget(job)  # it may have failed before this request's first answer: never report it twice
    if job.exc is not None:
        raise job.exc  # the usual status for it (the app's handler): 503 for a missing dataset, ...
    return JSONResponse(job.as_json(), status_code=503, headers=retry)  # a bug (logged) or the server exiting


@router.get(
    "/compare",
    responses={
        200: {"content": {"application/json": {}, "image/png": {}}, "description": "the comparison"},
        202: {
            "model": CompareProgress,
            "description": "the first request for a pair: computing in the background; ask again after Retry-After",
        },
        404: {"description": "no model with one of these ids"},
        422: {"description": "not two ids, models trained on different datasets, or no held-out images for val"},
        429: {"description": "as many comparisons as one server runs at once are being computed (Retry-After)"},
        503: {"description": "the comparison failed (e.g. the dataset is missing); asking again starts it again"},
    },
)
def compare_models(
    request: Request,
    models: Annotated[
        str,
        Query(
            max_length=200,
            description="two model ids separated by a comma (no spaces); the same id twice compares a model "
            "with itself",
            examples=["a,b"],
            json_schema_extra={"pattern": PAIR_RE.pattern},
        ),
    ],
    registry: RegistryDep,
    split: Annotated[Split, Query(description="val: images both models held out; test: the test set")] = "val",
    format: Annotated[Literal["json", "png"], Query(description="the numbers, or one figure")] = "json",
) -> Response:
    """Accuracy and per-class accuracy of each model, agreement, the 2x2 right/wrong table, the classes where they
    differ most, and conv1's filters matched one-to-one (cosine similarity, with the similarity of each pair).

    The first request for a pair answers 202 with `progress` (0..1) and `eta_s` while both models run over the
    split in the background; ask again (Retry-After) for the 200. Cached per pair of weight hashes and split."""
    ids = parse_pair(models)
    ea, eb = registry.entry(ids[0]), registry.entry(ids[1])  # 404 for an unknown id; metadata only, nothing loaded
    if ea.meta.get("dataset") != eb.meta.get("dataset") or ea.meta.get("num_classes") != eb.meta.get("num_classes"):
        raise HTTPException(
            422,
            f"{ids[0]} was trained on {ea.meta.get('dataset')} and {ids[1]} on {eb.meta.get('dataset')}: "
            "only models of one dataset compare",
        )
    if split == "val":
        _held_out(ea.meta, eb.meta, ids)  # 422 now rather than after a 202
    settings = request.app.state.settings
    stem = _cache_stem(settings.home, ea.meta, eb.meta, split)
    svc = compare_service(request)
    got = svc.get(registry, ids, split, stem)
    if isinstance(got, Comparison):
        if got.report is None:
            return _pending(svc, got)
        got = got.report
    report = {**got, "models": {"a": ids[0], "b": ids[1]}}  # the same weights may serve under another id
    if format == "json":
        return Response(json.dumps(report), media_type="application/json")
    return Response(_png(registry, report, stem), media_type="image/png")
