"""CIFAR-10/100 from their standard pickle folders, the seed's augmentations, and two input paths."""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from models.errors import DatasetMissing, UnknownDataset


@dataclass(frozen=True)
class DatasetInfo:
    """What we need to know of a dataset to read, normalise and name it."""

    folder: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar-10-batches-py", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar-100-python", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def dataset_info(name: str) -> DatasetInfo:
    """The facts of a dataset by name, or a clear error."""
    if name not in DATASETS:
        raise UnknownDataset(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


@dataclass
class ArrayDataset:
    """A whole split in memory: uint8 images (N, 3, H, W), int64 labels (N,), class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, start: int, stop: int | None = None) -> ArrayDataset:
        """A contiguous slice, sharing memory."""
        return ArrayDataset(self.images[start:stop], self.labels[start:stop], self.classes)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Loads the CIFAR pickles while refusing every global but numpy's array rebuilders."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_pickle(path: Path) -> dict[str, object]:
    with path.open("rb") as f:
        raw = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _folder(root: str | Path, name: str, download: bool) -> Path:
    info = dataset_info(name)
    folder = Path(root) / info.folder
    if not folder.is_dir() and download:
        import torchvision  # only where a network exists

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(root), train=True, download=True)
    if not folder.is_dir():
        raise DatasetMissing(
            f"dataset {name!r} not found: expected the folder {folder} (the standard python-pickle layout). "
            f"Get it with `convlens data {name} --dest {root}` (or `make data` for CIFAR-10 into var/data)."
        )
    return folder


def load_cifar(root: str | Path, name: str = "cifar10", train: bool = True, download: bool = False) -> ArrayDataset:
    """Read a CIFAR split from `root/<folder>` straight from its pickles (no md5 check)."""
    folder = _folder(root, name, download)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key, meta_file, names_key = "labels", "batches.meta", "label_names"
    else:
        files = ["train"] if train else ["test"]
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    datas: list[np.ndarray] = []
    labels: list[int] = []
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise DatasetMissing(f"dataset {name!r} is incomplete: {path} is missing")
        batch = _read_pickle(path)
        datas.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(v) for v in batch[label_key])  # type: ignore[attr-defined]
    meta_path = folder / meta_file
    if meta_path.is_file():
        classes = [str(c) for c in _read_pickle(meta_path)[names_key]]  # type: ignore[attr-defined]
    else:
        classes = [str(i) for i in range(dataset_info(name).num_classes)]
    images = torch.from_numpy(np.concatenate(datas))
    return ArrayDataset(images, torch.tensor(labels, dtype=torch.int64), classes)


def train_val_split(ds: ArrayDataset, val_size: int) -> tuple[ArrayDataset, ArrayDataset | None]:
    """Hold out the last `val_size` training images for choosing hyperparameters."""
    if val_size <= 0:
        return ds, None
    if val_size >= len(ds):
        raise ValueError(f"val_size {val_size} must be smaller than the {len(ds)} training images")
    return ds.subset(0, len(ds) - val_size), ds.subset(len(ds) - val_size)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 or [0,1] float (N, 3, H, W) -> normalised float32."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop after zero padding (torchvision's RandomCrop(padding=pad)), on a whole batch."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image left-right with probability 1/2."""
    mask = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(3), x)


@dataclass
class Augment:
    """The seed's input pipeline switches."""

    crop: bool = True
    flip: bool = True
    resize: int | None = None  # the seed's 224 variant upsamples 32x32 inputs


class DeviceLoader:
    """The whole uint8 split lives on the device; crop, flip and normalise run on batches of tensors."""

    def __init__(
        self,
        ds: ArrayDataset,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        augment: Augment | None = None,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.images = ds.images.to(device)
        self.labels = ds.labels.to(device)
        self.batch_size = batch_size
        self.mean, self.std = mean, std
        self.augment = augment or Augment(crop=False, flip=False)
        self.shuffle = shuffle
        self.generator = generator or torch.Generator()

    def __len__(self) -> int:
        return math.ceil(self.labels.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.labels.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            if self.augment.crop:
                x = random_crop(x, 4, self.generator)
            if self.augment.flip:
                x = random_flip(x, self.generator)
            x = normalize(x, self.mean, self.std)
            if self.augment.resize:
                x = F.interpolate(x, size=self.augment.resize, mode="bilinear", align_corners=False)
            yield x, self.labels[idx]


class _TorchvisionDataset(Dataset[tuple[torch.Tensor, int]]):
    """The standard per-image path: PIL image -> torchvision transforms."""

    def __init__(self, ds: ArrayDataset, transform: object) -> None:
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        img = Image.fromarray(self.ds.images[i].permute(1, 2, 0).numpy())
        return self.transform(img), int(self.ds.labels[i])  # type: ignore[operator]


def torchvision_transform(mean: tuple[float, ...], std: tuple[float, ...], augment: Augment) -> object:
    """The seed's transform as torchvision composes it."""
    from torchvision import transforms as T

    steps: list[object] = []
    if augment.crop:
        steps.append(T.RandomCrop(32, padding=4))
    if augment.flip:
        steps.append(T.RandomHorizontalFlip())
    if augment.resize:
        steps.append(T.Resize(augment.resize))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def make_dataloader(
    ds: ArrayDataset,
    batch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: Augment | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
) -> DataLoader[tuple[torch.Tensor, int]]:
    """A standard torch DataLoader over PIL images, for comparison with the device-resident path."""
    tf = torchvision_transform(mean, std, augment or Augment(crop=False, flip=False))
    return DataLoader(
        _TorchvisionDataset(ds, tf),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
