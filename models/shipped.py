"""The model that ships inside the package, and `export_model`, which makes such a model with its model card.

A shipped model is a pair `<id>.safetensors` (half precision, ~22 MB) + `<id>.json` (the checkpoint metadata
with the weights' sha256, verified at every load, and a `card`: data, recipe, wall time, hardware, test
accuracy with and without flip TTA, per-class accuracy and the confusion matrix, known limits).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from models.checkpoints import atomic_write_json, load_checkpoint, meta_path, save_checkpoint
from models.data import Augment, DeviceLoader, dataset_info, load_cifar
from models.device import resolve_device
from models.runs import validate_run_id

SHIPPED_DIR = Path(__file__).parent / "weights"
SHIPPED_ID = "convlens-resnet18-cifar10"  # the seed's stem at 48px: the default (16x cheaper to serve)
CIFAR_STEM_ID = "convlens-resnet18-cifarstem-cifar10"  # the CIFAR stem (3x3 conv, no max-pool) at 32px
SHIPPED_IDS = (SHIPPED_ID, CIFAR_STEM_ID)


def limits(input_size: int = 32) -> list[str]:
    """The card's known limits for a model that sees `input_size` x `input_size` inputs."""
    first = "Inputs are resized to 32x32 (centre crop of the shorter side): fine detail of larger photos is lost."
    if input_size != 32:
        first = (
            "Inputs are resized to 32x32 (centre crop of the shorter side), then upsampled to "
            f"{input_size}x{input_size} as in training: fine detail of larger photos is lost."
        )
    return [first, *LIMITS]


LIMITS = [
    "Trained on CIFAR-10's ten classes only: any other object gets one of those ten labels, often confidently.",
    "Photos far from CIFAR-10 (other framing, lighting, cameras, drawings) are out of distribution; "
    "accuracy there is unmeasured and lower.",
    "Weights are stored in half precision and computed in float32; the accuracy below is measured on those weights.",
]


def hardware() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out: dict[str, Any] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return out


def per_class(confusion: list[list[int]], classes: list[str]) -> dict[str, float]:
    """Recall per class from a confusion matrix (rows: true class)."""
    return {c: (row[i] / max(sum(row), 1)) for i, (c, row) in enumerate(zip(classes, confusion, strict=True))}


def export_model(
    stem: Path,
    out_dir: Path,
    model_id: str,
    data_root: Path,
    run: dict[str, Any] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Write `<out_dir>/<model_id>.{safetensors,json}` in half precision and measure its card on the test set."""
    from models.trainer import evaluate  # the training code: only where a model is exported

    validate_run_id(model_id)
    model, meta = load_checkpoint(stem, "cpu")
    half = out_dir / model_id
    # Save half precision first, then evaluate exactly what ships (fp16 weights computed in float32).
    save_checkpoint(model, half, {k: v for k, v in meta.items() if k not in ("sha256", "weights", "versions")}, True)
    dev = resolve_device(device)
    shipped, smeta = load_checkpoint(half, dev)
    info = dataset_info(str(meta["dataset"]))
    test = load_cifar(data_root, str(meta["dataset"]), train=False)

    size = int(meta.get("input_size", 32))
    # A model trained on upsampled images is tested on them upsampled the same way (cfg.resize).
    aug = Augment(crop=False, flip=False, resize=size if size != test.images.shape[-1] else None)

    def batches() -> DeviceLoader:
        return DeviceLoader(test, 500, info.mean, info.std, dev, aug, shuffle=False)

    t0 = time.perf_counter()
    plain = evaluate(shipped, batches(), dev, info.num_classes)
    tta = evaluate(shipped, batches(), dev, info.num_classes, tta_flip=True)
    classes = [str(c) for c in smeta.get("classes") or test.classes]
    run = run or {}
    wall = None
    if run.get("started") and run.get("finished"):
        wall = float(run["finished"]) - float(run["started"])
    card = {
        "data": f"{meta['dataset']}: 45,000 training images, 5,000 held out for validation (model selection), "
        f"{len(test):,} test images reported once",
        "recipe": meta.get("config", {}),
        "epochs": meta.get("config", {}).get("epochs"),
        "best_epoch": meta.get("epoch"),
        "train_run": run.get("id"),
        "wall_time_s": wall,
        "hardware": run.get("hardware") or hardware(),
        "test_acc": plain["acc"],
        "test_acc_tta_flip": tta["acc"],
        "test_loss": plain["loss"],
        "per_class_acc": per_class(plain["confusion"], classes),
        "per_class_acc_tta_flip": per_class(tta["confusion"], classes),
        "val_acc": (meta.get("metrics") or {}).get("val_acc"),
        "fp32_test_acc": (meta.get("metrics") or {}).get("test_acc"),
        "eval_seconds": time.perf_counter() - t0,
        "limits": limits(size),
    }
    smeta = json.loads(meta_path(half).read_text())
    smeta["card"] = card
    smeta["confusion"] = plain["confusion"]
    smeta["metrics"] = {
        **(meta.get("metrics") or {}),
        "test_acc": plain["acc"],
        "test_acc_tta": tta["acc"],
    }
    atomic_write_json(meta_path(half), smeta)
    return smeta
