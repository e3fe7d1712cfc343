"""Top-k dataset examples per channel (Zeiler-Fergus figure 2): built once per checkpoint, then served.

The index of a model lives in the run store at `<home>/topk/<model id>-<sha256[:16]>/index.{json,safetensors}`,
keyed by the weights' hash, so a retrained model under the same id gets a new index and a shipped model (whose
folder may be read-only) gets one too. The first request for a model starts a background build on a private
copy of the network (no hooks on the served one) and answers 202 with its progress until the index is ready.
Several API processes build one index once: a build holds an exclusive lock on `<stem>.lock` (flock), and a
process that waited for it loads what the other one wrote.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.data import ArrayDataset, load_cifar, train_val_split
from models.errors import ConvLensError
from models.resnet import LAYER_NAMES, ResNet18
from models.visual import TopKIndex, build_topk_index, load_topk_index, save_topk_index, topk_index_exists
from service.registry import LoadedModel

log = logging.getLogger("convlens.topk")

INDEX_K = 16  # hits kept per channel; a request asks for up to this many
DEFAULT_VAL_SIZE = 5000


@dataclass
class Build:
    """A build in progress (or failed): what a 202 reports."""

    model: str
    started: float = field(default_factory=time.time)
    progress: float = 0.0
    error: str | None = None
    thread: threading.Thread | None = None

    def as_json(self) -> dict[str, Any]:
        elapsed = time.time() - self.started
        eta = elapsed / self.progress * (1 - self.progress) if self.progress > 0 else None
        return {
            "status": "failed" if self.error else "building",
            "model": self.model,
            "progress": round(self.progress, 4),
            "elapsed_s": round(elapsed, 2),
            "eta_s": None if eta is None else round(eta, 2),
            "detail": self.error
            or f"the top-k index of model {self.model} is being built ({self.progress:.0%}); retry shortly",
        }


def examples_split(meta: dict[str, Any]) -> tuple[bool, int]:
    """(train split?, val_size): the model's own validation images when it held some out, else the test set."""
    cfg = meta.get("config") or {}
    val = int(cfg.get("val_size", DEFAULT_VAL_SIZE)) if isinstance(cfg, dict) else DEFAULT_VAL_SIZE
    return (val > 0, val)


def load_examples(data_root: Path, meta: dict[str, Any]) -> tuple[ArrayDataset, str]:
    """The images the index ranks: the model's validation split (its last val_size training images) or test set."""
    dataset = str(meta.get("dataset", "cifar10"))
    use_val, val = examples_split(meta)
    if use_val:
        _, held = train_val_split(load_cifar(data_root, dataset, train=True), val)
        assert held is not None
        return held, f"{dataset} validation (last {val} training images)"
    return load_cifar(data_root, dataset, train=False), f"{dataset} test"


def at_input_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images (N, 3, s, s) resized (bilinear) to the model's input size; unchanged when it is s."""
    if size == images.shape[-1]:
        return images
    up = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8)


class TopKService:
    """Finds, builds (once, in the background) and caches the top-k index of each model."""

    def __init__(self, home: Path, data_root: Path, batch_size: int = 250) -> None:
        self.home, self.data_root, self.batch_size = Path(home), Path(data_root), batch_size
        self._lock = threading.Lock()
        self._builds: dict[Path, Build] = {}
        self._indexes: dict[Path, TopKIndex] = {}
        self._examples: dict[tuple[str, bool, int], tuple[ArrayDataset, str]] = {}

    def stem(self, loaded: LoadedModel) -> Path:
        sha = str(loaded.meta.get("sha256") or "unhashed")[:16]
        return self.home / "topk" / f"{loaded.id}-{sha}" / "index"

    def examples(self, meta: dict[str, Any]) -> tuple[ArrayDataset, str]:
        """The example images (cached: the same split serves every request)."""
        use_val, val = examples_split(meta)
        key = (str(meta.get("dataset", "cifar10")), use_val, val)
        with self._lock:
            hit = self._examples.get(key)
        if hit is None:
            hit = load_examples(self.data_root, meta)
            with self._lock:
                self._examples[key] = hit
        return hit

    def get(self, loaded: LoadedModel) -> TopKIndex | Build:
        """The index if built, else the (started or failed) build; a failed build is retried on the next call."""
        stem = self.stem(loaded)
        with self._lock:
            index = self._indexes.get(stem)
            if index is not None:
                return index
            build = self._builds.get(stem)
            if build is not None and build.error is None:
                return build
            if build is not None:  # report the failure once, then let the next request try again
                del self._builds[stem]
                return build
            if topk_index_exists(stem):
                index = load_topk_index(stem)
                self._indexes[stem] = index
                return index
            build = Build(loaded.id)
            build.thread = threading.Thread(
                target=self._build, args=(loaded, stem, build), name=f"topk-{loaded.id}", daemon=True
            )
            self._builds[stem] = build
        build.thread.start()
        return build

    def _build(self, loaded: LoadedModel, stem: Path, build: Build) -> None:
        try:
            with build_lock(stem):
                if topk_index_exists(stem):  # another API process built it while this one waited
                    index = load_topk_index(stem)
                else:
                    index = self._compute(loaded, stem, build)
            with self._lock:
                self._indexes[stem] = index
                self._builds.pop(stem, None)
        except ConvLensError as e:
            build.error = str(e)
            log.warning("top-k index of %s failed: %s", loaded.id, e)
        except Exception as e:  # a bug must not leave requests waiting on a build that never ends
            build.error = f"building the top-k index failed: {type(e).__name__}: {e}"
            log.exception("top-k index of %s failed", loaded.id)

    def _compute(self, loaded: LoadedModel, stem: Path, build: Build) -> TopKIndex:
        t0 = time.perf_counter()
        ds, split = self.examples(loaded.meta)
        model: ResNet18 = copy.deepcopy(loaded.model).eval()  # type: ignore[assignment]  # a private copy: hooks never touch the served model
        # A model trained on upsampled inputs ranks upsampled images (normalisation commutes with this).
        images = at_input_size(ds.images, int(loaded.meta.get("input_size", ds.images.shape[-1])))

        def progress(frac: float) -> None:
            build.progress = frac

        with torch.no_grad():
            index = build_topk_index(
                model,
                images,
                loaded.meta["mean"],
                loaded.meta["std"],
                k=INDEX_K,
                layers=LAYER_NAMES,
                batch_size=self.batch_size,
                progress=progress,
                meta={"model": loaded.id, "sha256": loaded.meta.get("sha256"), "split": split},
            )
        save_topk_index(index, stem)
        log.info("built the top-k index of %s over %d images in %.1fs", loaded.id, len(ds), time.perf_counter() - t0)
        return index


@contextlib.contextmanager
def build_lock(stem: Path) -> Iterator[None]:
    """Hold `<stem>.lock` exclusively (waits for a build in another process; released if this one dies)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
