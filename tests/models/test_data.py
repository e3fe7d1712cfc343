"""CIFAR folders, the restricted unpickler, splits, and the two input paths."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.data import (
    Augment,
    DeviceLoader,
    dataset_info,
    load_cifar,
    make_dataloader,
    random_crop,
    random_flip,
    train_val_split,
)
from models.errors import DatasetMissing, UnknownDataset


def test_loads_both_datasets(synthetic_data: Path) -> None:
    train = load_cifar(synthetic_data, "cifar10", train=True)
    test = load_cifar(synthetic_data, "cifar10", train=False)
    assert train.images.shape == (1000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (200, 3, 32, 32)
    assert train.classes[:2] == ["airplane", "automobile"] and len(train.classes) == 10
    c100 = load_cifar(synthetic_data, "cifar100", train=True)
    assert len(c100) == 500 and len(c100.classes) == 100 and int(c100.labels.max()) < 100


def test_missing_folder_names_it_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissing) as e:
        load_cifar(tmp_path, "cifar10")
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value) and "convlens data cifar10 --dest" in str(e.value)
    with pytest.raises(UnknownDataset, match="cifar100"):
        dataset_info("mnist")


def test_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_cifar(tmp_path, "cifar10")


def test_validation_split_is_the_tail(synthetic_data: Path) -> None:
    ds = load_cifar(synthetic_data, "cifar10")
    tr, val = train_val_split(ds, 100)
    assert val is not None and len(tr) == 900 and len(val) == 100
    assert torch.equal(val.images, ds.images[900:])
    assert train_val_split(ds, 0)[1] is None


def test_random_crop_is_a_crop_of_the_zero_padded_image() -> None:
    x = torch.randint(1, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = random_crop(x, 4, torch.Generator().manual_seed(0))
    padded = F.pad(x, (4, 4, 4, 4))
    offsets = set()
    for i in range(16):
        hits = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(out[i], padded[i, :, dy : dy + 32, dx : dx + 32])
        ]
        assert hits, f"image {i} is not a crop"
        offsets.add(hits[0])
    assert len(offsets) > 1  # per-image offsets, not one for the batch


def test_random_flip_flips_about_half() -> None:
    x = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, a.flip(2))) for o, a in zip(out, x, strict=True)]
    same = [bool(torch.equal(o, a)) for o, a in zip(out, x, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 60 < sum(flipped) < 140


def test_device_path_equals_torchvision_path_without_augmentation(synthetic_data: Path) -> None:
    ds = load_cifar(synthetic_data, "cifar10", train=False)
    info = dataset_info("cifar10")
    dev = DeviceLoader(ds, 64, info.mean, info.std, shuffle=False)
    tv = make_dataloader(ds, 64, info.mean, info.std, shuffle=False)
    assert len(dev) == len(tv) == 4
    for (xa, ya), (xb, yb) in zip(dev, tv, strict=True):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, atol=1e-5, rtol=1e-5)


def test_device_loader_augments_and_resizes(synthetic_data: Path) -> None:
    ds = load_cifar(synthetic_data, "cifar10", train=False)
    info = dataset_info("cifar10")
    loader = DeviceLoader(
        ds,
        50,
        info.mean,
        info.std,
        augment=Augment(crop=True, flip=True, resize=64),
        generator=torch.Generator().manual_seed(1),
    )
    batches = list(loader)
    assert len(batches) == 4 and batches[0][0].shape == (50, 3, 64, 64)
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(ds.labels.tolist())  # a permutation of the whole split
