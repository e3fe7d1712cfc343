"""Benchmark feature visualization (models/featurevis.py) on the shipped model: efficacy and speed.

Efficacy: for each sampled channel of layer2..layer4, the rendered image's mean (post-ReLU) activation of its
channel divided by the highest mean activation any validation image gives that channel (the model's own 5,000
held-out training images, fed as the service feeds them). Target: > 1 for at least 95% of channels.
Speed: 64 channels of layer3 in one batched call (target: <= 60 s wall), and the CPU time per channel of the
batched call against channels rendered one at a time (same steps; target >= 5x).

Run: `.venv/bin/python bench/featurevis.py [--steps 256] [--sample 32] [--single 8]` (`--sample 0`: every
channel; `--skip-efficacy`, `--skip-speed`, `--skip-diversity` leave a part out). Diversity: diversity=4 against
four unpenalized images per channel (the same seeds): the activation kept and the Gram cosine between copies.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run standalone from a checkout

from models.checkpoints import load_checkpoint  # noqa: E402
from models.data import load_cifar, train_val_split  # noqa: E402
from models.featurevis import (  # noqa: E402
    DEFAULT_STEPS,
    DIVERSITY_WEIGHT,
    diversity_penalty,
    layer_pre_relu,
    model_input,
    visualize,
)
from models.resnet import ResNet18  # noqa: E402
from models.shipped import SHIPPED_DIR, SHIPPED_ID  # noqa: E402

LAYERS = ("layer2", "layer3", "layer4")


def best_validation_means(
    model: ResNet18, meta: dict[str, Any], data: Path, layers: tuple[str, ...], batch: int = 250
) -> dict[str, torch.Tensor]:
    """Per layer, each channel's highest mean post-ReLU activation over the model's validation images."""
    cfg = meta.get("config") or {}
    val_size = int(cfg.get("val_size", 5000)) if isinstance(cfg, dict) else 5000
    _, val = train_val_split(load_cifar(data, str(meta.get("dataset", "cifar10")), train=True), val_size)
    assert val is not None
    best: dict[str, torch.Tensor] = {}
    mean, std, size = meta["mean"], meta["std"], int(meta.get("input_size", 32))
    with torch.no_grad():
        for start in range(0, len(val), batch):
            x = model_input(val.images[start : start + batch].float() / 255, mean, std, 32, size)
            for layer in layers:
                m = torch.relu(layer_pre_relu(model, x, layer)).flatten(2).mean(2).amax(0)
                best[layer] = m if layer not in best else torch.maximum(best[layer], m)
    return best


def sample(width: int, n: int) -> list[int]:
    """n channels evenly spaced over 0..width-1 (all of them for n = 0 or n >= width)."""
    if n <= 0 or n >= width:
        return list(range(width))
    return [round(i * width / n) for i in range(n)]


def efficacy(model: ResNet18, meta: dict[str, Any], args: argparse.Namespace) -> None:
    """The ratio rendered / best validation image, per sampled channel of each layer."""
    t = time.perf_counter()
    best = best_validation_means(model, meta, args.data, LAYERS)
    print(f"best validation means of {', '.join(LAYERS)}: {time.perf_counter() - t:.1f} s")
    ratios_all: list[float] = []
    for layer in LAYERS:
        chans = sample(best[layer].shape[0], args.sample)
        t = time.perf_counter()
        fv = visualize(model, layer, chans, meta["mean"], meta["std"], meta["input_size"], steps=args.steps)
        dt = time.perf_counter() - t
        ratios = (fv.activation / best[layer][chans].clamp_min(1e-6)).tolist()
        ratios_all += ratios
        print(
            f"  {layer}: {len(chans)} of {best[layer].shape[0]} channels, {args.steps} steps, {dt:.0f} s: "
            f"ratio > 1 for {sum(r > 1 for r in ratios) / len(ratios):.1%}; median {statistics.median(ratios):.2f}, "
            f"min {min(ratios):.2f}, max {max(ratios):.2f}"
        )
    share = sum(r > 1 for r in ratios_all) / len(ratios_all)
    print(f"efficacy: {share:.1%} of {len(ratios_all)} channels beat every validation image (target >= 95%)")


def speed(model: ResNet18, meta: dict[str, Any], args: argparse.Namespace) -> None:
    """64 channels of layer3 batched (wall and CPU), then `--single` channels one call each (CPU)."""
    mean, std, size = meta["mean"], meta["std"], meta["input_size"]
    chans = list(range(64))
    w, c = time.perf_counter(), time.process_time()
    visualize(model, "layer3", chans, mean, std, size, steps=args.steps)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    print(f"  batched: 64 channels of layer3, {args.steps} steps: {wall:.1f} s wall (target <= 60), {cpu:.1f} s CPU")
    c = time.process_time()
    visualize(model, "layer3", chans[: args.single], mean, std, size, steps=args.steps, chunk=1)
    single = (time.process_time() - c) / args.single
    print(
        f"  one at a time (chunk=1, one optimization per channel): {single:.2f} s CPU per channel "
        f"({args.single} channels) vs batched {cpu / 64:.2f}: batched is {single / (cpu / 64):.1f}x (target >= 5x)"
    )


def diversity(model: ResNet18, meta: dict[str, Any], args: argparse.Namespace) -> None:
    """diversity=4 against 4 independent images (no penalty) of 8 layer3 channels: activation kept, Grams apart."""
    mean, std, size = meta["mean"], meta["std"], meta["input_size"]
    chans = sample(256, 8)
    runs = {
        w: visualize(model, "layer3", chans, mean, std, size, diversity=4, steps=args.steps, diversity_weight=w)
        for w in (0.0, DIVERSITY_WEIGHT)
    }
    with torch.no_grad():
        # diversity_penalty sums k - 1 cosines per image: / 3 is the mean cosine between two copies.
        sims = {
            w: diversity_penalty(
                layer_pre_relu(model, model_input(fv.images.flatten(0, 1), mean, std, 32, size), "layer3"), 4
            )
            .mean()
            .item()
            / 3
            for w, fv in runs.items()
        }
    kept = float((runs[DIVERSITY_WEIGHT].activation.mean(1) / runs[0.0].activation.mean(1)).median())
    print(
        f"  diversity=4 (weight {DIVERSITY_WEIGHT}) on 8 layer3 channels: median activation {kept:.0%} of the "
        f"unpenalized images'; mean Gram cosine between copies {sims[DIVERSITY_WEIGHT]:.3f} "
        f"(unpenalized: {sims[0.0]:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--sample", type=int, default=32, help="channels per layer for efficacy (0: all)")
    parser.add_argument("--single", type=int, default=8, help="channels rendered one at a time for the baseline")
    parser.add_argument("--data", type=Path, default=Path("var/data"), help="folder holding cifar-10-batches-py")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-efficacy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-diversity", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(SHIPPED_DIR / SHIPPED_ID)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); model {SHIPPED_ID} "
        f"({meta['arch']}, input {meta.get('input_size', 32)}px); {args.steps} steps"
    )
    if not args.skip_speed:
        speed(model, meta, args)
    if not args.skip_diversity:
        diversity(model, meta, args)
    if not args.skip_efficacy:
        efficacy(model, meta, args)


if __name__ == "__main__":
    main()
