"""Benchmark the explanation methods: latency on one image and on a batch of 32, and occlusion batching.

CPU, seed stem (`resnet18`), float32. Each method alone (its share of the forward included), then every method in
one call; then occlusion with every patch batched vs one patch per forward pass (target: batched >= 5x).
Run: `.venv/bin/python bench/explain.py [--threads 2] [--repeat 3]`. The machine is shared: quote the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run standalone from a checkout

from models.checkpoints import load_checkpoint  # noqa: E402
from models.data import DATASETS, load_cifar, normalize  # noqa: E402
from models.errors import CheckpointError, DatasetMissing  # noqa: E402
from models.explain import METHODS, explain  # noqa: E402
from models.resnet import ResNet18, build_model  # noqa: E402

INFO = DATASETS["cifar10"]


def timed_pair(fa: Callable[[], object], fb: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median wall times of fa and fb called alternately `repeat` times (after a warm-up of each), so that both
    see the same load on a shared machine; a ratio of the two is then meaningful even when absolutes drift."""
    fa(), fb()
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(repeat):
        for fn, times in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def load_model(stem: Path) -> tuple[ResNet18, str]:
    """The seed-reproduction checkpoint when present, else random weights; says which."""
    try:
        model, meta = load_checkpoint(stem)
        return model, f"checkpoint {stem} (epoch {meta.get('epoch')}, {meta.get('arch')})"
    except CheckpointError:
        torch.manual_seed(0)
        return build_model("resnet18").eval(), f"random weights (no checkpoint at {stem})"


def test_images(root: Path, n: int) -> tuple[torch.Tensor, str]:
    """The first n CIFAR-10 test images, normalised, or random ones when the dataset is absent."""
    try:
        images = load_cifar(root, "cifar10", train=False).images[:n]
        source = f"CIFAR-10 test images from {root}"
    except DatasetMissing:
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        source = "random images (CIFAR-10 not found)"
    return normalize(images, INFO.mean, INFO.std), source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("var/runs/seed-reproduction/checkpoints/best"))
    parser.add_argument("--data", type=Path, default=Path("var/data"), help="folder holding cifar-10-batches-py")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats of each side, alternated (median)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layer", default="layer4")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, weights = load_model(args.checkpoint)
    images, source = test_images(args.data, args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {weights}; {source}")
    print(f"default parameters, layer={args.layer}; median of {args.repeat} alternated; ms per call (ms per image)")

    def call(x: torch.Tensor, methods: list[str], params: dict[str, Any] | None = None) -> Callable[[], object]:
        """A timed call: explain x with these methods."""
        return lambda: explain(model, x, methods, layer=args.layer, params=params)

    one, batch = images[:1], images
    rows = [*[[m] for m in METHODS], list(METHODS)]
    print(f"  {'method':22s} {'1 image':>10s} {f'batch of {args.batch}':>22s}  per-image speedup")
    for methods in rows:
        t1, tb = timed_pair(call(one, methods), call(batch, methods), args.repeat)
        name = methods[0] if len(methods) == 1 else "all, one call"
        per = tb / args.batch
        print(f"  {name:22s} {t1 * 1e3:8.1f} ms {tb * 1e3:10.1f} ms ({per * 1e3:6.2f}) {t1 / per:8.1f}x")

    def separately() -> None:
        for m in METHODS:  # one call per method: each runs its own shared forward
            explain(model, one, [m], layer=args.layer)

    t_sep, t_one = timed_pair(separately, call(one, list(METHODS)), args.repeat)
    print(f"  one image, every method: separate calls {t_sep * 1e3:.1f} ms, one call {t_one * 1e3:.1f} ms")

    # Occlusion: the same code with chunk=1 is exactly one occluded image per forward pass.
    loop = {"occlusion": {"chunk": 1}}
    for n in (1, 4):
        x = images[:n]
        batched = explain(model, x, ["occlusion"], layer=args.layer)["occlusion"]
        looped = explain(model, x, ["occlusion"], layer=args.layer, params=loop)["occlusion"]
        t_batched, t_loop = timed_pair(call(x, ["occlusion"]), call(x, ["occlusion"], loop), args.repeat)
        diff = float((looped.extras["probability"] - batched.extras["probability"]).abs().max())
        patches = batched.extras["probability"][0].numel()
        print(
            f"occlusion, {n} image(s) x {patches} patches (patch 8, stride 2): batched {t_batched * 1e3:.1f} ms, "
            f"one patch per forward {t_loop * 1e3:.1f} ms -> {t_loop / t_batched:.1f}x (target >= 5x); "
            f"max |prob diff| {diff:.1e}"
        )


if __name__ == "__main__":
    main()
