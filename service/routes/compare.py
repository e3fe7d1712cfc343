"""Routes: two models compared on the same images (GET /compare), computed once per pair of weight hashes.

The answer is cached in the run store at `<home>/compare/<sha a>-<sha b>-<split>.{json,png}` (the first 16 hex
digits of each model's weights hash), so a retrained model under the same id is compared anew, and every API
process reads what one of them computed.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, HTTPException, Query, Response

from models.atomic import atomic_write_bytes, atomic_write_json
from models.compare import compare_png, compare_predictions, match_filters, predict_labels
from models.data import ArrayDataset, load_cifar
from models.errors import InvalidArgument
from models.visual import filters
from service.deps import RegistryDep, SettingsDep
from service.registry import LoadedModel, validate_model_id
from service.topk import at_input_size, examples_split

router = APIRouter(tags=["models"])

Split = Literal["val", "test"]
CHUNK = 500  # images resized and predicted at a time
_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def _pair(models: str) -> tuple[str, str]:
    ids = [m.strip() for m in models.split(",")]
    if len(ids) != 2 or not all(ids):
        raise HTTPException(422, f"models= takes exactly two model ids separated by a comma, got {models[:200]!r}")
    return validate_model_id(ids[0]), validate_model_id(ids[1])


def _images(data_root: Path, a: LoadedModel, b: LoadedModel, split: Split) -> tuple[ArrayDataset, str]:
    """The test set, or the last training images both models held out (the smaller of their val_size)."""
    dataset = str(a.meta.get("dataset", "cifar10"))
    if split == "test":
        return load_cifar(data_root, dataset, train=False), f"{dataset} test"
    held = {m.id: examples_split(m.meta)[1] for m in (a, b)}
    n = min(held.values())
    if n <= 0:
        none = [k for k, v in held.items() if v <= 0]
        raise HTTPException(422, f"model {none[0]} held out no validation images (val_size 0); use split=test")
    full = load_cifar(data_root, dataset, train=True)
    return full.subset(len(full) - n), f"{dataset} validation (last {n} training images)"


def _conv1(loaded: LoadedModel) -> torch.Tensor:
    return filters(loaded.model, "conv1")


def _predict(m: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    """Predicted classes, resized to the model's input size a chunk at a time (a 224-pixel model would otherwise
    hold the whole split upsampled: 1.5 GB for CIFAR's test set)."""
    size = int(m.meta.get("input_size", 32))
    chunks = [images[i : i + CHUNK] for i in range(0, images.shape[0], CHUNK)]
    return torch.cat([predict_labels(m.model, at_input_size(c, size), m.meta["mean"], m.meta["std"]) for c in chunks])


def compute(data_root: Path, a: LoadedModel, b: LoadedModel, split: Split) -> dict[str, Any]:
    """The comparison of two loaded models on one split (JSON-ready)."""
    ds, described = _images(data_root, a, b, split)
    first = _predict(a, ds.images)
    same = a.meta.get("sha256") is not None and a.meta.get("sha256") == b.meta.get("sha256")
    preds = [first, first if same else _predict(b, ds.images)]  # a model with itself: predict once
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
    return home / "compare" / f"{sha[0][:16]}-{sha[1][:16]}-{split}"


def _lock(stem: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(stem, threading.Lock())


@router.get(
    "/compare",
    responses={
        200: {"content": {"application/json": {}, "image/png": {}}, "description": "the comparison"},
        404: {"description": "no model with one of these ids"},
        422: {"description": "not two ids, or models trained on different datasets"},
    },
)
def compare_models(
    models: Annotated[str, Query(max_length=200, description="two model ids, comma-separated", examples=["a,b"])],
    registry: RegistryDep,
    settings: SettingsDep,
    split: Annotated[Split, Query(description="val: images both models held out; test: the test set")] = "val",
    format: Annotated[Literal["json", "png"], Query(description="the numbers, or one figure")] = "json",
) -> Response:
    """Accuracy and per-class accuracy of each model, agreement, the 2x2 right/wrong table, the classes where they
    differ most, and conv1's filters matched one-to-one (cosine similarity, with the similarity of each pair)."""
    id_a, id_b = _pair(models)
    ea, eb = registry.entry(id_a), registry.entry(id_b)  # 404 for an unknown id; metadata only, nothing loaded
    if ea.meta.get("dataset") != eb.meta.get("dataset") or ea.meta.get("num_classes") != eb.meta.get("num_classes"):
        raise HTTPException(
            422,
            f"{id_a} was trained on {ea.meta.get('dataset')} and {id_b} on {eb.meta.get('dataset')}: "
            "only models of one dataset compare",
        )
    stem = _cache_stem(settings.home, ea.meta, eb.meta, split)
    with _lock(stem) if stem else threading.Lock():
        json_path = stem.with_suffix(".json") if stem else None
        if json_path and json_path.is_file():
            report = json.loads(json_path.read_text())
        else:
            report = compute(settings.data_root, registry.get(id_a), registry.get(id_b), split)
            if json_path:
                atomic_write_json(json_path, report)
        report["models"] = {"a": id_a, "b": id_b}  # the same weights may serve under another id
        if format == "json":
            return Response(json.dumps(report), media_type="application/json")
        png_path = stem.with_suffix(f".{id_a}.{id_b}.png") if stem else None
        if png_path and png_path.is_file():
            png = png_path.read_bytes()
        else:
            png = compare_png(report, _conv1(registry.get(id_a)), _conv1(registry.get(id_b)))
            if png_path:
                atomic_write_bytes(png_path, png)
    return Response(png, media_type="image/png")
