"""Training input paths vs the bare model step, on the real CIFAR-10, in one process.

    .venv/bin/python bench/train_throughput.py [--data var/data] [--batches 100] [--arch resnet18]

Prints seconds per epoch (45,000 training images) for: the bare train step on pre-made batches (the ceiling),
the device-resident loader (the trainer's default), and the torchvision DataLoader path (0 and 2 workers),
with each path's ratio to the bare step. Timings interleave the paths in rounds and keep the best round,
since the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from models.data import Augment, DeviceLoader, dataset_info, load_cifar, make_dataloader, train_val_split
from models.resnet import build_model

EPOCH_IMAGES = 45_000


def step_fn(arch: str) -> tuple[nn.Module, object]:
    """A model and its seed-config training step."""
    torch.manual_seed(0)
    model = build_model(arch, 10).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def timed(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int, step: object) -> float:
    """Seconds per image over n batches (after one warm-up batch)."""
    it: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(batches)
    x, y = next(it)
    step(x, y)  # type: ignore[operator]
    images, t0 = 0, time.perf_counter()
    for x, y in itertools.islice(it, n):
        step(x, y)  # type: ignore[operator]
        images += int(y.shape[0])
    return (time.perf_counter() - t0) / images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="var/data")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batches", type=int, default=60, help="timed batches per path per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ns = ap.parse_args()

    info = dataset_info("cifar10")
    train, _ = train_val_split(load_cifar(ns.data, "cifar10", train=True), 5000)
    aug = Augment(crop=True, flip=True)
    _, step = step_fn(ns.arch)
    gen = torch.Generator().manual_seed(0)
    # The bare step sees the same augmented batches, made before the clock starts.
    premade = list(
        itertools.islice(
            DeviceLoader(train, ns.batch_size, info.mean, info.std, "cpu", aug, generator=gen), ns.batches + 1
        )
    )

    def device_path() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return DeviceLoader(train, ns.batch_size, info.mean, info.std, "cpu", aug, generator=gen)

    def dataloader(workers: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return make_dataloader(train, ns.batch_size, info.mean, info.std, aug, num_workers=workers, generator=gen)

    paths = {
        "bare model step (ceiling)": lambda: premade,
        "device-resident loader (default)": device_path,
        "DataLoader, 0 workers": lambda: dataloader(0),
        "DataLoader, 2 workers": lambda: dataloader(2),
    }
    best = {name: float("inf") for name in paths}
    for _ in range(ns.rounds):
        for name, make in paths.items():
            best[name] = min(best[name], timed(make(), ns.batches, step))
    base = best["bare model step (ceiling)"]
    print(
        f"arch={ns.arch} batch={ns.batch_size} threads={torch.get_num_threads()} "
        f"batches={ns.batches} rounds={ns.rounds}"
    )
    print(f"{'path':36} {'images/s':>9} {'s/epoch':>8} {'x bare':>7}")
    for name, spi in best.items():
        print(f"{name:36} {1 / spi:9.1f} {spi * EPOCH_IMAGES:8.1f} {spi / base:7.3f}")


if __name__ == "__main__":
    main()
