"""Route: GET /visualize, the images that drive a layer's channels hardest (models/featurevis.py).

Small requests (images x steps up to SYNC_WORK) are computed while the request waits; larger ones start in the
background and answer 202 with progress and `eta_s` (as /topk does) until they are done, then 200. One process
runs at most MAX_BUILDS computations (then 429 + Retry-After), and one that no request asked about for ABANDON_S
stops (its client went away; asking again starts it again). Results lie
in the run store at `<home>/featurevis/<model id>-<sha256[:16]>/<key>.{safetensors,json}`, the key a hash of the
weights' sha256 and every parameter, so they survive restarts and a retrained model gets new ones. Identical
requests compute once: concurrent ones in this process join one build, and other API processes wait on the
build's lock (flock) and then read what it wrote. The optimization runs on its own thread with a private,
BN-folded copy of the network (no hooks on the served model), not on the batcher's inference thread, so
/predict keeps answering while it runs.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from starlette.concurrency import run_in_threadpool

from models import render
from models.checkpoints import atomic_write_bytes, atomic_write_json
from models.data import load_cifar, train_val_split
from models.device import use_bf16
from models.errors import ConvLensError, InvalidArgument
from models.featurevis import (
    CIFAR10_COLOR_COV,
    DEFAULT_STEPS,
    DIVERSITY_WEIGHT,
    LEARNING_RATE,
    MAX_DIVERSITY,
    FeatureVis,
    Robustness,
    color_covariance,
    layer_width,
    visualize,
)
from models.resnet import WIDEST, ResNet18, canonical_layer
from models.reverse import select_channels
from service.deps import ModelParam, RegistryDep
from service.grammar import CHANNEL_LIST_PATTERN, MAX_CHANNELS_CHARS, parse_channels
from service.images import DATASET_IMAGE_SIZE
from service.registry import LoadedModel
from service.routes.visual import ERRORS, PNG_NPY_JSON, FormatQ, LayerQ, model_headers, respond
from service.topk import Build, build_lock, examples_split

log = logging.getLogger("convlens.featurevis")
router = APIRouter(tags=["look inside"])

VERSION = 1  # part of every cache key: bump it when the algorithm's results change
MAX_STEPS = 2048
MAX_IMAGES = 1024  # channels x max(diversity, 1) per request: a whole layer4 twice over
MAX_WORK = 512 * 512  # images x steps per request: a whole layer4 at 512 steps
SYNC_WORK = 16 * 512  # up to this, the request waits for the answer; above, 202 and the background
MAX_BUILDS = 2  # computations running at once in one API process; more answer 429 + Retry-After
ABANDON_S = 60.0  # a background computation no request asked about for this long stops
TILE_SCALE = 4  # png: a 32x32 image becomes a 128x128 tile
TENSORS = ("images", "values", "activation", "history")
MAX_STORED = 256  # results kept per model in the run store (least recently used go first): seeds are endless


@dataclass(frozen=True)
class Params:
    """One visualization, fully resolved: what the key hashes."""

    layer: str
    channels: tuple[int, ...]
    objective: str
    diversity: int
    steps: int
    seed: int

    @property
    def images(self) -> int:
        return len(self.channels) * max(self.diversity, 1)


class Stopped(Exception):
    """Raised from a computation's progress callback to end it: nobody waits for it, or the process exits."""


@dataclass
class Job(Build):
    """A computation in progress: Build's progress and ETA, plus its result or error when it ends."""

    done: threading.Event = field(default_factory=threading.Event)
    result: FeatureVis | None = None
    exc: BaseException | None = None
    seen: float = field(default_factory=time.monotonic)  # when a request last asked for it
    waiters: int = 0  # requests blocked until it ends (the synchronous answers)

    def check(self) -> None:
        """Stop when the process exits, or when no request asked for it for ABANDON_S (its client went away)."""
        if _EXITING.is_set() or (self.waiters == 0 and time.monotonic() - self.seen > ABANDON_S):
            raise Stopped


_EXITING = threading.Event()
_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


@atexit.register
def _stop_computations() -> None:
    """At exit, end running computations between two steps: a thread killed inside torch aborts the process."""
    _EXITING.set()
    for thread in list(_THREADS):
        thread.join(10)


class FeatureVisService:
    """Computes each distinct visualization once (per process, and across processes through the run store)."""

    def __init__(self, home: Path, data_root: Path) -> None:
        self.home, self.data_root = Path(home), Path(data_root)
        self._lock = threading.Lock()
        self._jobs: dict[Path, Job] = {}
        self._covariances: dict[tuple[str, int], torch.Tensor] = {}
        self.computed = 0  # optimizations this process ran (a cache hit or a joined build adds none)

    def stem(self, loaded: LoadedModel, params: Params) -> Path:
        """Where a result lives: under the model's id and hash, named by the hash of every parameter."""
        sha = str(loaded.meta.get("sha256") or "unhashed")
        p = next(loaded.model.parameters())
        key = {
            "version": VERSION,
            "sha256": sha,
            "mean": loaded.meta["mean"],
            "std": loaded.meta["std"],
            "input_size": loaded.meta.get("input_size", DATASET_IMAGE_SIZE),
            "image_size": loaded.meta.get("image_size", DATASET_IMAGE_SIZE),
            "bf16": use_bf16(p.device, "bf16"),  # bf16 and float32 optimizations end in different images
            "constants": [LEARNING_RATE, DIVERSITY_WEIGHT, asdict(Robustness())],
            **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(params).items()},
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.home / "featurevis" / f"{loaded.id}-{sha[:16]}" / digest

    def get(self, loaded: LoadedModel, params: Params) -> FeatureVis | Job:
        """The stored result, or the (new or joined) computation of it."""
        stem = self.stem(loaded, params)
        with self._lock:
            job = self._jobs.get(stem)
            if job is not None:
                if job.done.is_set():  # a failure (a success leaves): report it once, the next request tries again
                    del self._jobs[stem]
                job.seen = time.monotonic()
                return job
            stored = read_result(stem, params)
            if stored is not None:
                return stored
            if sum(not j.done.is_set() for j in self._jobs.values()) >= MAX_BUILDS:
                raise HTTPException(
                    429,
                    f"{MAX_BUILDS} visualizations are being computed, the most one server runs at once; retry "
                    "shortly (or ask for a result already computed)",
                    headers={"Retry-After": "5"},
                )
            job = Job(loaded.id)
            thread = job.thread = threading.Thread(target=self._run, args=(loaded, params, stem, job), daemon=True)
            self._jobs[stem] = job
            _THREADS.add(thread)
        thread.start()
        return job

    def running(self) -> int:
        """How many computations are running now."""
        with self._lock:
            return sum(not j.done.is_set() for j in self._jobs.values())

    def wait(self, job: Job) -> None:
        """Block until a computation ends (it keeps running while anyone waits)."""
        with self._lock:
            job.waiters += 1
        try:
            job.done.wait()
        finally:
            with self._lock:
                job.waiters -= 1

    def _run(self, loaded: LoadedModel, params: Params, stem: Path, job: Job) -> None:
        try:
            with build_lock(stem):
                job.result = read_result(stem, params)  # another API process computed it while this one waited
                if job.result is None:
                    job.result = self._compute(loaded, params, job)
                    write_result(stem, job.result)
                    prune(stem.parent, MAX_STORED)
            with self._lock:
                self._jobs.pop(stem, None)  # from now on it is read from the run store
        except Stopped:
            with self._lock:
                self._jobs.pop(stem, None)  # the next request starts it again
            job.error = "stopped: no request asked for it for a while, or the server is exiting; ask again"
        except ConvLensError as e:
            job.exc, job.error = e, str(e)
        except Exception as e:  # a bug must not leave requests waiting for a computation that never ends
            job.exc, job.error = e, f"feature visualization failed: {type(e).__name__}: {e}"
            log.exception("feature visualization for %s failed", loaded.id)
        finally:
            job.done.set()

    def _compute(self, loaded: LoadedModel, params: Params, job: Job) -> FeatureVis:
        net: ResNet18 = loaded.model  # type: ignore[assignment]
        meta = loaded.meta
        with self._lock:
            self.computed += 1

        def progress(frac: float) -> None:
            job.progress = frac
            job.check()

        return visualize(
            net,
            params.layer,
            list(params.channels),
            meta["mean"],
            meta["std"],
            input_size=int(meta.get("input_size", DATASET_IMAGE_SIZE)),
            image_size=int(meta.get("image_size", DATASET_IMAGE_SIZE)),
            objective=params.objective,  # type: ignore[arg-type]
            diversity=params.diversity,
            steps=params.steps,
            seed=params.seed,
            color_cov=self.color_cov(meta),
            progress=progress,
        )

    def color_cov(self, meta: dict[str, Any]) -> torch.Tensor:
        """The dataset's pixel colour covariance: recorded for CIFAR-10, else computed once from its training split."""
        dataset = str(meta.get("dataset", "cifar10"))
        if dataset == "cifar10":
            return torch.tensor(CIFAR10_COLOR_COV, dtype=torch.float64)
        _, val = examples_split(meta)
        with self._lock:
            cov = self._covariances.get((dataset, val))
        if cov is None:
            train, _ = train_val_split(load_cifar(self.data_root, dataset, train=True), val)
            cov = color_covariance(train)
            with self._lock:
                self._covariances[(dataset, val)] = cov
        return cov


def write_result(stem: Path, fv: FeatureVis) -> None:
    """`<stem>.safetensors`, then `<stem>.json` with its sha256 (written last: it marks the result complete)."""
    data = save_safetensors({name: getattr(fv, name).contiguous() for name in TENSORS})
    atomic_write_bytes(Path(f"{stem}.safetensors"), data)
    info = {k: getattr(fv, k) for k in ("channels", "layer", "objective", "diversity", "steps", "seed")}
    atomic_write_json(
        Path(f"{stem}.json"),
        {**info, "history_steps": fv.history_steps, "sha256": hashlib.sha256(data).hexdigest()},
    )


def prune(folder: Path, keep: int) -> None:
    """Delete all but the `keep` most recently used results of a folder (each result's JSON first)."""
    found = []
    for meta in folder.glob("*.json"):
        with contextlib.suppress(FileNotFoundError):  # another process pruned it meanwhile
            found.append((meta.stat().st_mtime, meta))
    for _, meta in sorted(found, reverse=True)[keep:]:
        for path in (meta, meta.with_suffix(".safetensors"), meta.with_suffix(".lock")):
            path.unlink(missing_ok=True)


def read_result(stem: Path, params: Params) -> FeatureVis | None:
    """A stored result, or None when there is none (or it is damaged: then it is computed again)."""
    try:
        info = json.loads(Path(f"{stem}.json").read_text())
        data = Path(f"{stem}.safetensors").read_bytes()
    except (OSError, ValueError):
        return None
    if hashlib.sha256(data).hexdigest() != info.get("sha256") or tuple(info.get("channels", ())) != params.channels:
        log.warning("stored visualization %s is damaged; computing it again", stem)
        return None
    with contextlib.suppress(OSError):  # the run store may be read-only; then nothing is pruned either
        os.utime(f"{stem}.json")  # used now: prune keeps it
    t = load_safetensors(data)
    return FeatureVis(
        images=t["images"],
        channels=list(info["channels"]),
        layer=str(info["layer"]),
        objective=str(info["objective"]),
        diversity=int(info["diversity"]),
        steps=int(info["steps"]),
        seed=int(info["seed"]),
        values=t["values"],
        activation=t["activation"],
        history=t["history"],
        history_steps=list(info["history_steps"]),
    )


def featurevis_service(request: Request) -> FeatureVisService:
    svc: FeatureVisService | None = getattr(request.app.state, "featurevis", None)
    if svc is None:
        settings = request.app.state.settings
        svc = request.app.state.featurevis = FeatureVisService(settings.home, settings.data_root)
    return svc


def resolve(net: ResNet18, layer: str, channels: str, objective: str, diversity: int, steps: int, seed: int) -> Params:
    """Validate a request against the model and the bounds (each error names its field) -> its Params."""
    canon = canonical_layer(layer)  # UnknownLayer (422) lists the valid names
    spec = parse_channels(channels)
    if isinstance(spec, int):
        raise InvalidArgument(
            "channels=top:N needs an image (it ranks channels by their activation for one), and /visualize "
            "takes none: give 'all' or a list of channels"
        )
    chosen = select_channels(spec, torch.zeros(layer_width(net, canon)))
    if diversity == 1:
        raise InvalidArgument(f"diversity=1 has nothing to differ from: give 0 (off) or 2..{MAX_DIVERSITY}")
    params = Params(canon, tuple(chosen), objective, diversity, steps, seed)
    if params.images > MAX_IMAGES:
        raise InvalidArgument(
            f"channels x diversity = {params.images} images; the limit is {MAX_IMAGES}: ask for fewer channels"
        )
    if params.images * steps > MAX_WORK:
        raise InvalidArgument(
            f"steps x images = {steps} x {params.images} = {params.images * steps:,}; the limit is {MAX_WORK:,}: "
            "ask for fewer steps or channels"
        )
    return params


def sheet_png(fv: FeatureVis, scale: int) -> bytes:
    """The images as one labelled grid (channel, or channel/copy with diversity), upscaled nearest-neighbour."""
    tiles = fv.images.flatten(0, 1) if fv.diversity else fv.images
    labels = [f"{c}/{j}" for c in fv.channels for j in range(fv.diversity)] if fv.diversity else fv.channels
    return render.labelled_grid_png(tiles, [str(t) for t in labels], scale)


def _info(fv: FeatureVis) -> dict[str, Any]:
    return {
        "layer": fv.layer,
        "channels": fv.channels,
        "objective": fv.objective,
        "diversity": fv.diversity,
        "steps": fv.steps,
        "seed": fv.seed,
        "objective_values": fv.values.tolist(),
        "activation": fv.activation.tolist(),
        "history_steps": fv.history_steps,
        "history": fv.history.tolist(),
    }


@router.get(
    "/visualize",
    summary="Feature visualization: the synthesized image that drives each channel hardest",
    responses={
        200: PNG_NPY_JSON,
        202: {"description": "a large request is being computed: progress (0..1) and eta_s; retry the same URL"},
        429: {"description": "as many visualizations as one server runs at once are being computed (Retry-After)"},
        **ERRORS,
    },
    response_class=Response,
)
async def get_visualize(
    request: Request,
    registry: RegistryDep,
    model: ModelParam,
    layer: LayerQ = "layer3",
    channels: Annotated[
        str,
        Query(
            max_length=MAX_CHANNELS_CHARS,
            description=f"`all` or a comma-separated list of channel indices (0..{WIDEST - 1}); no `top:N`, which "
            "ranks channels by their activation for an image, and /visualize takes none",
            examples=["0,1,2,3", "all"],
            json_schema_extra={"pattern": CHANNEL_LIST_PATTERN},
        ),
    ] = "0,1,2,3",
    objective: Annotated[
        Literal["channel", "neuron", "negative"],
        Query(description="channel: maximize the map's mean; neuron: its centre position; negative: minimize the mean"),
    ] = "channel",
    diversity: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_DIVERSITY,
            description="0: one image per channel; k >= 2: k different ones (1 has nothing to differ from)",
            json_schema_extra={"not": {"const": 1}},
        ),
    ] = 0,
    steps: Annotated[int, Query(ge=1, le=MAX_STEPS, description="optimization steps")] = DEFAULT_STEPS,
    seed: Annotated[int, Query(ge=0, le=2**31 - 1, description="the same seed gives the same images")] = 0,
    scale: Annotated[int, Query(ge=1, le=16, description="png: nearest-neighbour upscale per tile")] = TILE_SCALE,
    format: FormatQ = "png",
) -> Response:
    """The images (float32 RGB in [0, 1] at the dataset's size) that maximize each chosen channel of a layer.

    Objectives read the layer's pre-ReLU value, so channels that start at zero still learn. npy: `[C, 3, H, W]`
    (`[C, k, 3, H, W]` with diversity=k), channels in the order asked; json: the same numbers, plus the objective
    per channel at the end and every 16 steps; png: a labelled grid.
    """
    loaded = await registry.aget(model)
    net: ResNet18 = loaded.model  # type: ignore[assignment]
    params = resolve(net, layer, channels, objective, diversity, steps, seed)
    svc = featurevis_service(request)
    got = await run_in_threadpool(svc.get, loaded, params)
    hit = isinstance(got, FeatureVis)
    if isinstance(got, Job) and params.images * params.steps <= SYNC_WORK:
        await run_in_threadpool(svc.wait, got)
    if isinstance(got, Job) and got.done.is_set():
        if isinstance(got.exc, ConvLensError):
            raise got.exc
        if got.result is None:  # a bug (logged where it happened) or a stop at exit: the next request tries again
            return JSONResponse(got.as_json(), status_code=503, headers={"Retry-After": "2", **model_headers(loaded)})
        got = got.result
    if isinstance(got, Job):
        body = {**got.as_json(), "detail": f"computing {params.images} images x {params.steps} steps; retry shortly"}
        return JSONResponse(body, status_code=202, headers={"Retry-After": "2", **model_headers(loaded)})
    fv = got
    headers = {"X-ConvLens-Channels": ",".join(map(str, fv.channels)), "X-ConvLens-Cache": "hit" if hit else "miss"}
    return await run_in_threadpool(
        respond, format, loaded, lambda: sheet_png(fv, scale), fv.images, _info(fv), f"visualize-{fv.layer}", headers
    )
