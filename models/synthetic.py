"""Small synthetic CIFAR-format datasets whose classes are learnable, for tests and smoke runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from models.data import dataset_info

CLASSES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def synthetic_images(n: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Class k: a colour of its own plus an oriented stripe pattern, under noise (N, 3072) uint8."""
    labels = rng.integers(0, num_classes, size=n)
    yy, xx = np.mgrid[0:32, 0:32]
    imgs = np.empty((n, 3, 32, 32), dtype=np.float32)
    for i, k in enumerate(labels):
        hue = np.array(
            [
                np.cos(2 * np.pi * k / num_classes),
                np.cos(2 * np.pi * (k / num_classes + 1 / 3)),
                np.cos(2 * np.pi * (k / num_classes + 2 / 3)),
            ]
        )
        angle = np.pi * k / num_classes
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.8)
        base = 128 + 70 * hue[:, None, None] + 30 * stripes[None]
        imgs[i] = base + rng.normal(0, 20, size=(3, 32, 32))
    return np.clip(imgs, 0, 255).astype(np.uint8).reshape(n, -1), [int(v) for v in labels]


def write_synthetic_cifar(
    root: str | Path, name: str = "cifar10", n_train: int = 1000, n_test: int = 200, seed: int = 0
) -> Path:
    """Write `root/<folder>` in the standard pickle layout (5 train batches for CIFAR-10)."""
    info = dataset_info(name)
    folder = Path(root) / info.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = CLASSES10 if info.num_classes == 10 else [f"class{i}" for i in range(info.num_classes)]

    def dump(fname: str, obj: dict[str, object]) -> None:
        with (folder / fname).open("wb") as f:
            pickle.dump(obj, f, protocol=2)

    if name == "cifar10":
        per = n_train // 5
        for b in range(1, 6):
            data, labels = synthetic_images(per, 10, rng)
            dump(f"data_batch_{b}", {"data": data, "labels": labels, "batch_label": f"synthetic {b}"})
        data, labels = synthetic_images(n_test, 10, rng)
        dump("test_batch", {"data": data, "labels": labels})
        dump("batches.meta", {"label_names": classes, "num_cases_per_batch": per, "num_vis": 3072})
    else:
        for split, n in (("train", n_train), ("test", n_test)):
            data, labels = synthetic_images(n, info.num_classes, rng)
            dump(split, {"data": data, "fine_labels": labels, "coarse_labels": [0] * n})
        dump("meta", {"fine_label_names": classes, "coarse_label_names": ["all"]})
    return folder
