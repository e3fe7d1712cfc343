"""The atlas: the feature visualization of every chosen channel of a layer (or of every named layer), computed as
one resumable job, chunk by chunk, and stored in the run store.

    <home>/atlas/<id>/atlas.json                 the request, its status and progress (each write atomic)
    <home>/atlas/<id>/chunks/<NNNN>.safetensors  one finished chunk: images, objective values, activations; its
                                                 metadata names the layer, the channels and the attempt that
                                                 rendered it
    <home>/atlas/<id>/lease, cancel              the worker holding the job; the cancel flag (a file, as for runs)

A chunk file is written to a temp name and renamed, so it exists whole or not at all: it is the unit of resume.
A job delivered again (its worker was killed, or stopped by a warm shutdown) renders only the chunks whose file
is missing or damaged. Every image draws its randomness from (seed, channel, copy) alone (models.featurevis), so
a chunk's images do not depend on which chunks ran before it, nor on the attempt.

The id is a hash of the weights' sha256, the model's input transform and every parameter that changes the images
(chunking included: it changes floating-point rounding in batched kernels), so the same request is never
computed twice: asking again answers the existing atlas.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from models import render
from models.atomic import atomic_write_bytes, atomic_write_json
from models.data import load_cifar, train_val_split
from models.errors import ConvLensError, InvalidArgument
from models.featurevis.image import CIFAR10_COLOR_COV, Robustness, color_covariance
from models.featurevis.network import OBJECTIVES, layer_width
from models.featurevis.optimize import DEFAULT_STEPS, DIVERSITY_WEIGHT, LEARNING_RATE, FeatureVis, visualize
from models.resnet import LAYER_NAMES, ResNet18, canonical_layer
from models.reverse import select_channels
from models.runs import RUN_ID_RE, validate_id

VERSION = 1  # part of every atlas id: bump it when the images an atlas holds would change
DEFAULT_CHUNK = 16  # channels per chunk: a killed job loses at most one chunk's work
MAX_CHUNK = 256
ATLAS_FILE = "atlas.json"
CANCEL_FILE = "cancel"
ACTIVE = ("queued", "running")
CHUNK_TENSORS = ("images", "values", "activation")
DEFAULT_VAL_SIZE = 5000  # a checkpoint without a recorded val_size held out this many training images


class AtlasNotFound(ConvLensError, LookupError):
    """No atlas with that id in the run store."""


class Stopped(Exception):
    """Raised from a chunk's progress callback to end the job between two steps (cancel, shutdown, lost lease)."""


def validate_atlas_id(atlas_id: str) -> str:
    """Atlas ids name folders: run ids' rules (1-64 letters, digits, '-' or '_'), never a path."""
    return validate_id(atlas_id, RUN_ID_RE, "atlas", 64)


@dataclass(frozen=True)
class AtlasSpec:
    """What an atlas renders: channels per layer, the objective, steps, seed, and channels per chunk."""

    layers: tuple[tuple[str, tuple[int, ...]], ...]
    objective: str = "channel"
    steps: int = DEFAULT_STEPS
    seed: int = 0
    chunk: int = DEFAULT_CHUNK

    @property
    def channels(self) -> int:
        return sum(len(c) for _, c in self.layers)

    def plan(self) -> list[tuple[str, tuple[int, ...]]]:
        """The chunks, in the order they are rendered: each layer's channels in runs of `chunk`."""
        return [(layer, ch[i : i + self.chunk]) for layer, ch in self.layers for i in range(0, len(ch), self.chunk)]

    def as_json(self) -> dict[str, Any]:
        return {
            "layers": [{"layer": layer, "channels": list(ch)} for layer, ch in self.layers],
            "objective": self.objective,
            "steps": self.steps,
            "seed": self.seed,
            "chunk": self.chunk,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AtlasSpec:
        layers = tuple((str(e["layer"]), tuple(int(c) for c in e["channels"])) for e in d["layers"])
        return cls(layers, str(d["objective"]), int(d["steps"]), int(d["seed"]), int(d["chunk"]))


def make_spec(
    model: ResNet18,
    layer: str,
    channels: Literal["all"] | list[int],
    objective: str = "channel",
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
) -> AtlasSpec:
    """Validate a request against the model: `layer` a named layer or "all" (conv1..layer4, every channel);
    `channels` "all" or a list (duplicates dropped, order kept). Each error names what was wrong."""
    if objective not in OBJECTIVES:
        raise InvalidArgument(f"objective: unknown {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    if steps < 1 or not 1 <= chunk <= MAX_CHUNK or seed < 0:
        raise InvalidArgument(f"steps must be >= 1, chunk 1..{MAX_CHUNK}, seed >= 0; got {steps}, {chunk}, {seed}")
    if layer == "all":
        if channels != "all":
            raise InvalidArgument("channels: layer=all renders every channel of every layer; give channels=all")
        layers = tuple((name, tuple(range(layer_width(model, name)))) for name in LAYER_NAMES)
        return AtlasSpec(layers, objective, steps, seed, chunk)
    canon = canonical_layer(layer)  # UnknownLayer lists the valid names
    # select_channels' errors, as every look-inside endpoint gives them (an index past the layer names its range).
    chosen = tuple(dict.fromkeys(select_channels(channels, torch.zeros(layer_width(model, canon)))))
    return AtlasSpec(((canon, chosen),), objective, steps, seed, chunk)


def atlas_id(spec: AtlasSpec, meta: dict[str, Any]) -> str:
    """The id of an atlas: its first layer's name (or "all") and a hash of the weights and every parameter."""
    key = {
        "version": VERSION,
        "sha256": str(meta.get("sha256") or "unhashed"),
        "mean": meta.get("mean"),
        "std": meta.get("std"),
        "input_size": meta.get("input_size", 32),
        "image_size": meta.get("image_size", 32),
        "constants": [LEARNING_RATE, DIVERSITY_WEIGHT, asdict(Robustness())],
        **spec.as_json(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    name = spec.layers[0][0] if len(spec.layers) == 1 else "all"
    return f"atlas-{name}-{digest[:20]}"


def new_record(atlas_id: str, model_id: str, sha256: str, stem: str, spec: AtlasSpec, queue: str) -> dict[str, Any]:
    """A queued atlas's atlas.json: the model (id, weights' hash, checkpoint stem as the API found it), the spec, and
    the queue it is sent through (a worker re-sends only its own queue's atlases)."""
    now = time.time()
    return {
        "id": validate_atlas_id(atlas_id),
        "model": model_id,
        "sha256": sha256,
        "stem": stem,
        "spec": spec.as_json(),
        "status": "queued",
        "queue": queue,
        "created": now,
        "updated": now,
        "attempts": 0,
        "lost": 0,
        "progress": {},
    }


class AtlasStore:
    """`<home>/atlas/<id>/`: atlas.json (one writer at a time: the API before a worker takes it, then the worker
    holding its lease), the finished chunks, the lease and the cancel flag."""

    def __init__(self, home: str | Path) -> None:
        self.home = Path(home)
        self.root = self.home / "atlas"

    def dir(self, atlas_id: str) -> Path:
        return self.root / validate_atlas_id(atlas_id)

    def chunk_path(self, atlas_id: str, index: int) -> Path:
        return self.dir(atlas_id) / "chunks" / f"{index:04d}.safetensors"

    @contextlib.contextmanager
    def _creating(self) -> Iterator[None]:
        """One creation at a time across API processes (flock), so two identical requests make one atlas."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".create.lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def create(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Write a new atlas.json unless the atlas exists: (its record, whether this call created it)."""
        with self._creating():
            path = self.dir(record["id"]) / ATLAS_FILE
            if path.is_file():
                return self.read(record["id"]), False
            atomic_write_json(path, record)
            return record, True

    def read(self, atlas_id: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.dir(atlas_id) / ATLAS_FILE).read_text())
        except FileNotFoundError as e:
            raise AtlasNotFound(f"no atlas {atlas_id!r}; GET /atlas lists them") from e
        return data

    def update(self, atlas_id: str, **fields: Any) -> dict[str, Any]:
        record = {**self.read(atlas_id), **fields, "updated": time.time()}
        atomic_write_json(self.dir(atlas_id) / ATLAS_FILE, record)
        return record

    def list_atlases(self) -> list[dict[str, Any]]:
        """Every readable atlas, newest first."""
        found = []
        for d in self.root.iterdir() if self.root.is_dir() else []:
            if RUN_ID_RE.fullmatch(d.name):
                with contextlib.suppress(OSError, ValueError):
                    found.append(json.loads((d / ATLAS_FILE).read_text()))
        return sorted(found, key=lambda r: r.get("created", 0), reverse=True)

    def request_cancel(self, atlas_id: str) -> None:
        (self.dir(atlas_id) / CANCEL_FILE).touch()

    def cancel_requested(self, atlas_id: str) -> bool:
        return (self.dir(atlas_id) / CANCEL_FILE).exists()

    def clear_cancel(self, atlas_id: str) -> None:
        (self.dir(atlas_id) / CANCEL_FILE).unlink(missing_ok=True)

    def write_chunk(self, atlas_id: str, index: int, fv: FeatureVis, attempt: int) -> None:
        info = {"layer": fv.layer, "channels": json.dumps(fv.channels), "attempt": str(attempt)}
        tensors = {name: getattr(fv, name).contiguous() for name in CHUNK_TENSORS}
        atomic_write_bytes(self.chunk_path(atlas_id, index), save_safetensors(tensors, metadata=info))

    def read_chunk(self, atlas_id: str, index: int, layer: str, channels: Sequence[int]) -> dict[str, Any] | None:
        """A finished chunk's tensors and metadata; None when it is missing, damaged or not the planned one."""
        try:
            data = self.chunk_path(atlas_id, index).read_bytes()
            tensors = load_safetensors(data)
            # safetensors' layout: an 8-byte little-endian header length, then the JSON header with __metadata__.
            info = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
        except (OSError, ValueError, SafetensorError):
            return None
        if info.get("layer") != layer or json.loads(info.get("channels", "null")) != list(channels):
            return None
        if set(tensors) != set(CHUNK_TENSORS) or tensors["images"].shape[0] != len(channels):
            return None
        return {**tensors, "attempt": int(info.get("attempt", 0))}

    def tidy(self, atlas_id: str) -> None:
        """Remove the temp files of chunk writes a kill interrupted (the chunk itself is rendered again)."""
        for tmp in (self.dir(atlas_id) / "chunks").glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def finished(self, atlas_id: str, spec: AtlasSpec) -> list[int]:
        """The chunks whose file exists (cheap: no reading; a damaged one is rendered again by the worker)."""
        return [i for i in range(len(spec.plan())) if self.chunk_path(atlas_id, i).is_file()]


def layer_images(store: AtlasStore, atlas_id: str, spec: AtlasSpec, layer: str) -> tuple[list[int], torch.Tensor]:
    """Every finished channel of one layer, in plan order, and their images (n, 3, H, W)."""
    channels: list[int] = []
    images = []
    for i, (name, chans) in enumerate(spec.plan()):
        if name == layer and (chunk := store.read_chunk(atlas_id, i, name, chans)) is not None:
            channels += chans
            images.append(chunk["images"])
    return channels, torch.cat(images) if images else torch.zeros(0, 3, 32, 32)


def layer_channels(store: AtlasStore, atlas_id: str, spec: AtlasSpec, layer: str) -> list[dict[str, Any]]:
    """Every planned channel of one layer, in plan order: whether it is finished, its tile on the sheet and the
    objective and activation its image reached (None until its chunk is finished).

    Tiles count only readable chunks, as layer_images does, so a tile index here is the tile the sheet draws."""
    out: list[dict[str, Any]] = []
    tile = 0
    for i, (name, chans) in enumerate(spec.plan()):
        if name != layer:
            continue
        chunk = store.read_chunk(atlas_id, i, name, chans)
        for j, c in enumerate(chans):
            row: dict[str, Any] = {"channel": c, "done": chunk is not None, "tile": None}
            row["objective_value"] = None if chunk is None else float(chunk["values"][j])
            row["activation"] = None if chunk is None else float(chunk["activation"][j])
            if chunk is not None:
                row["tile"], tile = tile, tile + 1
            out.append(row)
    return out


def channel_image(store: AtlasStore, atlas_id: str, spec: AtlasSpec, layer: str, channel: int) -> torch.Tensor | None:
    """One channel's image (3, H, W) in [0, 1], read from the one chunk that holds it (not the whole layer); None
    while that chunk is unfinished or when the atlas did not plan the channel (callers check that first)."""
    for i, (name, chans) in enumerate(spec.plan()):
        if name == layer and channel in chans:
            chunk = store.read_chunk(atlas_id, i, name, chans)
            return None if chunk is None else chunk["images"][chans.index(channel)]
    return None


def sheet_png(channels: Sequence[int], images: torch.Tensor, scale: int) -> bytes:
    """The contact sheet: one tile per channel, labelled with its index, upscaled nearest-neighbour."""
    return render.labelled_grid_png(images, [str(c) for c in channels], scale)


def channel_png(image: torch.Tensor, scale: int) -> bytes:
    """One channel's image (3, H, W) as a PNG, upscaled nearest-neighbour (scale 1: the pixels as optimized, which
    /predict and /featuremaps take back exactly, up to 8-bit quantization)."""
    return render.png_bytes(render.upscale(image, scale))


def dataset_color_cov(meta: dict[str, Any], data_root: Path) -> torch.Tensor:
    """The dataset's pixel colour covariance: recorded for CIFAR-10, else computed from the model's training split
    (as /visualize does, so an atlas and /visualize decorrelate colours the same way)."""
    dataset = str(meta.get("dataset", "cifar10"))
    if dataset == "cifar10":
        return torch.tensor(CIFAR10_COLOR_COV, dtype=torch.float64)
    cfg = meta.get("config")
    val = int(cfg.get("val_size", DEFAULT_VAL_SIZE)) if isinstance(cfg, dict) else DEFAULT_VAL_SIZE
    train, _ = train_val_split(load_cifar(data_root, dataset, train=True), val)
    return color_covariance(train)


@dataclass
class _Progress:
    """Counts for progress and ETA: channels finished, and the work this attempt did (for its speed)."""

    total: int
    chunks_total: int
    done: int = 0
    chunks_done: int = 0
    started: float = 0.0
    work: float = 0.0  # channels rendered by this attempt, a chunk in progress counted by its fraction

    def as_json(self, layer: str, partial: float) -> dict[str, Any]:
        work = self.work + partial
        elapsed = time.monotonic() - self.started
        left = self.total - self.done - partial
        return {
            "chunks_done": self.chunks_done,
            "chunks_total": self.chunks_total,
            "channels_done": self.done,
            "channels_total": self.total,
            "fraction": round((self.done + partial) / max(self.total, 1), 4),
            "layer": layer,
            "eta_s": round(elapsed / work * left, 1) if work > 0 else None,
        }


def render_atlas(
    store: AtlasStore,
    atlas_id: str,
    spec: AtlasSpec,
    model: ResNet18,
    meta: dict[str, Any],
    color_cov: torch.Tensor,
    attempt: int,
    report: Callable[[dict[str, Any], bool], None] = lambda p, force: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Render every chunk not finished yet, in plan order, writing each as soon as it is done; returns how many
    this call rendered. `report(progress, force)` after every step (force: a chunk just finished; callers
    throttle the rest); `should_stop()` after every step: True raises Stopped, dropping only the unfinished chunk.
    """
    plan = spec.plan()
    store.tidy(atlas_id)
    prog = _Progress(spec.channels, len(plan), started=time.monotonic())
    todo = []
    for i, (layer, chans) in enumerate(plan):
        if store.read_chunk(atlas_id, i, layer, chans) is None:
            todo.append(i)
        else:
            prog.done, prog.chunks_done = prog.done + len(chans), prog.chunks_done + 1
    report(prog.as_json(plan[todo[0]][0] if todo else "", 0.0), True)
    for i in todo:
        layer, chans = plan[i]

        def step(frac: float, layer: str = layer, n: int = len(chans)) -> None:
            if should_stop():
                raise Stopped
            report(prog.as_json(layer, frac * n), False)

        fv = visualize(
            model,
            layer,
            list(chans),
            meta["mean"],
            meta["std"],
            input_size=int(meta.get("input_size", 32)),
            image_size=int(meta.get("image_size", 32)),
            objective=spec.objective,  # type: ignore[arg-type]
            steps=spec.steps,
            seed=spec.seed,
            color_cov=color_cov,
            progress=step,
        )
        store.write_chunk(atlas_id, i, fv, attempt)
        prog.done, prog.chunks_done, prog.work = prog.done + len(chans), prog.chunks_done + 1, prog.work + len(chans)
        report(prog.as_json(layer, 0.0), True)
    return len(todo)
