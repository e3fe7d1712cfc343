"""Training input paths vs the bare model step, on the real CIFAR-10, in one process.

    .venv/bin/python bench/train_throughput.py [--data var/data] [--batches 100] [--arch resnet18]
    .venv/bin/python bench/train_throughput.py --timelapse [--train-limit 45000] [--rounds 2]
    .venv/bin/python bench/train_throughput.py --precision [--batches 6] [--batch-size 128]

Prints seconds per epoch (45,000 training images) for: the bare train step on pre-made batches (the ceiling),
the device-resident loader (the trainer's default), and the torchvision DataLoader path (0 and 2 workers),
with each path's ratio to the bare step. Timings interleave the paths in rounds and keep the best round,
since the machine is shared and noisy.

`--timelapse` instead runs the real trainer (`models.trainer.train`, TensorBoard on) with conv1 snapshots and
per-layer statistics off and on, alternating in rounds, and prints each one's best epoch (train, evaluation,
checkpoint: everything an epoch costs) and the on/off ratio.

`--precision` times one SGD training step of both stems (random data, the given batch size) in float32 and under
bf16 autocast, each NCHW and channels_last, and through torch.compile (`compile=true`) as the trainer runs it
(float32 where the CPU has no bf16 units, bf16 + channels_last where it has), in one process, and prints images/s
and each one's ratio to float32 NCHW (what `precision=bf16` and `compile` buy on this CPU;
`models.device.cpu_bf16_flags` says whether it has bf16 units). `--fp32-only` skips the bf16 rows.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from models.config import TrainConfig
from models.data import Augment, DeviceLoader, dataset_info, load_cifar, make_dataloader, train_val_split
from models.resnet import build_model
from models.runs import MetricsLog
from models.trainer import train

EPOCH_IMAGES = 45_000
# --precision: (bf16 autocast, channels_last, torch.compile) per row; the cpu-cifar-bf16 preset runs the third
# where the CPU has no bf16 units and the last where it has.
VARIANTS = (
    (False, False, False),
    (False, True, False),
    (False, False, True),
    (False, True, True),
    (True, False, False),
    (True, True, False),
    (True, True, True),
)


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


def timelapse_ab(ns: argparse.Namespace) -> None:
    """The trainer's epoch with snapshots and statistics off vs on, interleaved; the best epoch of each.

    Wall seconds are the epoch records' (train, evaluation, checkpoint, timelapse); CPU seconds are this
    process's between the end-of-epoch progress reports, so epoch 1 (which includes the setup) has none. On a
    shared machine the CPU figure is the steadier one.
    """
    cfg = TrainConfig(
        arch=ns.arch,
        batch_size=ns.batch_size,
        epochs=ns.epochs,
        train_limit=ns.train_limit,
        val_size=ns.val_size,
        milestones=[],
    )
    images = min(ns.train_limit, EPOCH_IMAGES)
    wall = {False: float("inf"), True: float("inf")}
    cpu = {False: float("inf"), True: float("inf")}
    own: list[tuple[float, float]] = []  # (the timelapse's own seconds, the epoch's seconds) of each epoch with it
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ns.rounds):
            for on in (False, True):
                run_dir = Path(tmp) / f"round{r}-{'on' if on else 'off'}"
                ends: list[float] = []

                def at_epoch_end(p: dict[str, object], ends: list[float] = ends) -> None:
                    if p.get("phase") == "epoch":
                        ends.append(time.process_time())

                train(cfg, run_dir, Path(ns.data), "cpu", progress=at_epoch_end, tensorboard=True, timelapse=on)
                recs = MetricsLog(run_dir / "metrics.jsonl").read()
                seconds = [x["seconds"] for x in recs if x["kind"] == "epoch"]
                own += zip([x["seconds"] for x in recs if x["kind"] == "layers" and x["epoch"]], seconds, strict=False)
                cpus = [b - a for a, b in itertools.pairwise(ends)]
                wall[on] = min(wall[on], *seconds)
                cpu[on] = min(cpu[on], *cpus) if cpus else cpu[on]
                shown = "; ".join(", ".join(f"{x:.2f}" for x in xs) for xs in (seconds, cpus))
                print(f"round {r} timelapse={'on ' if on else 'off'} epoch wall s; CPU s: {shown}", flush=True)
    print(
        f"arch={ns.arch} batch={ns.batch_size} threads={torch.get_num_threads()} images/epoch={images} "
        f"val={ns.val_size} epochs={ns.epochs} rounds={ns.rounds}"
    )
    print(f"{'timelapse':10} {'wall s/epoch':>12} {'images/s':>9} {'CPU s/epoch':>12}")
    for on in (False, True):
        print(f"{'on' if on else 'off':10} {wall[on]:12.2f} {images / wall[on]:9.1f} {cpu[on]:12.2f}")
    for name, t in (("wall", wall), ("CPU", cpu)):
        print(f"on/off {name} time per epoch: {t[True] / t[False]:.4f} ({100 * (t[True] / t[False] - 1):+.2f}%)")
    mean_own, mean_epoch = (sum(x) / len(own) for x in zip(*own, strict=True))
    print(
        f"the timelapse's own work (its `layers` records' seconds): {mean_own:.2f} s an epoch, "
        f"{100 * mean_own / mean_epoch:.2f}% of the epochs it ran in"
    )


def precision_table(ns: argparse.Namespace) -> None:
    """Images/s of a training step per stem, float32 vs bf16 autocast, NCHW vs channels_last (medians)."""
    from models.device import cpu_bf16_flags

    print(f"CPU bf16 flags: {','.join(cpu_bf16_flags()) or 'none'}; threads {torch.get_num_threads()}")
    for arch in ("resnet18", "resnet18-cifar"):
        base = None
        for bf16, cl, compiled in VARIANTS:
            if bf16 and ns.fp32_only:
                continue
            model, _ = step_fn(arch)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
            fmt = torch.channels_last if cl else torch.contiguous_format
            model = model.to(memory_format=fmt)
            forward = torch.compile(model, dynamic=False) if compiled else model  # as the trainer's compile=true
            x = torch.randn(ns.batch_size, 3, 32, 32).contiguous(memory_format=fmt)
            y = torch.randint(0, 10, (ns.batch_size,))
            times = []
            for _ in range(ns.batches + 1 + compiled):  # the first step (two when compiled: it compiles) untimed
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = nn.functional.cross_entropy(forward(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            timed_steps = times[1 + compiled :]
            ips = ns.batch_size / sorted(timed_steps)[len(timed_steps) // 2]
            base = base or ips
            name = f"{'bf16' if bf16 else 'fp32'}{' channels_last' if cl else ''}{' compiled' if compiled else ''}"
            print(f"{arch:15s} {name:28s} {ips:7.1f} images/s  {ips / base:5.2f}x fp32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="var/data")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batches", type=int, default=60, help="timed batches per path per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--timelapse", action="store_true", help="A/B the trainer with snapshots+statistics off/on")
    ap.add_argument("--train-limit", type=int, default=EPOCH_IMAGES, help="--timelapse: training images an epoch")
    ap.add_argument("--epochs", type=int, default=1, help="--timelapse: epochs a run")
    ap.add_argument("--val-size", type=int, default=5000, help="--timelapse: validation images (evaluated each epoch)")
    ap.add_argument("--precision", action="store_true", help="fp32 vs bf16 training steps, both stems")
    ap.add_argument("--fp32-only", action="store_true", help="--precision: skip the bf16 rows (slow if emulated)")
    ns = ap.parse_args()
    if ns.precision:
        precision_table(ns)
        return
    if ns.timelapse:
        timelapse_ab(ns)
        return

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
