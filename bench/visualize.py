"""Benchmark the model side of the visual endpoints: batched reverse passes and the top-k index build.

For one image and both stems, project all 64 conv1 and all 512 layer4 channels in one batched pass, and
compare with a loop of single-channel passes in the same process (target: batched >= 10x faster). Then time
building the top-k index over N test images. Run: `.venv/bin/python bench/visualize.py [--n 10000]`
(`--topk-archs` with no value skips the index; `--clock cpu` times CPU, steadier on a shared machine).

The CIFAR stem's layer4 misses the target on a CPU, and must: its per-channel loop is compute-bound, not
overhead-bound. One channel costs a forward (1.11 GFLOP) and a reverse pass (1.04 GFLOP) with 32x32 maps, ~43
GFLOP/s at batch 1 on one core here, while the batched pass still does the 1.04 GFLOP of reverse arithmetic per
channel (no exact shortcut: the seed fills the channel's map, the signal is dense from the first reverse block
on). Measured: ~80 GFLOP/s batched, ~90% of the core's sgemm peak (86), so ~3.8x; even at peak it is ~4x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run standalone from a checkout

from models.data import DATASETS, load_cifar, normalize  # noqa: E402
from models.errors import DatasetMissing  # noqa: E402
from models.resnet import ARCHS, LAYER_NAMES, ResNet18, build_model  # noqa: E402
from models.reverse import ReverseResNet, make_seeds, reconstruct  # noqa: E402
from models.visual import build_topk_index  # noqa: E402

INFO = DATASETS["cifar10"]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time, all threads


def timed(fn: Callable[[], object], repeat: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of `repeat` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)


def test_images(root: Path, n: int) -> tuple[torch.Tensor, str]:
    """The first n CIFAR-10 test images (uint8), or random ones when the dataset is absent."""
    try:
        images = load_cifar(root, "cifar10", train=False).images
        source = f"CIFAR-10 test set from {root}"
    except DatasetMissing:
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        source = "random images (CIFAR-10 not found)"
    if n > images.shape[0]:
        images = images.repeat((n + images.shape[0] - 1) // images.shape[0], 1, 1, 1)
    return images[:n], source


def bench_reverse(
    model: ResNet18, image: torch.Tensor, layer: str, repeat: int, clock: Callable[[], float] = time.perf_counter
) -> None:
    """All channels batched vs a loop of single-channel passes, for one image and layer."""
    batched = reconstruct(model, image, layer)
    channels = batched.channels
    t_batched = timed(lambda: reconstruct(model, image, layer), repeat, clock)

    # Baseline 1: what a naive endpoint does per channel, a whole reconstruct() (forward + reverse) each.
    t = clock()
    singles = [reconstruct(model, image, layer, channels=[c]).projections for c in channels]
    t_loop = clock() - t

    # Baseline 2: one recorded forward, then one dense reverse pass per channel (the seed's reverse network).
    rev = ReverseResNet(model)
    with torch.no_grad():
        rec = rev.record(image.unsqueeze(0), layer)
        act = rec.activations[layer][0]
        t = clock()
        for c in channels:
            rev(make_seeds(act, [c], "each", "activation"), rec, layer)
        t_reverse_loop = clock() - t

    diff = float((torch.cat(singles) - batched.projections).abs().max() / batched.projections.abs().max())
    print(
        f"  {layer:7s} {len(channels):4d} ch: batched {t_batched * 1e3:9.1f} ms | "
        f"loop of reconstruct() {t_loop * 1e3:9.1f} ms ({t_loop / t_batched:5.1f}x) | "
        f"loop of reverse passes {t_reverse_loop * 1e3:9.1f} ms ({t_reverse_loop / t_batched:5.1f}x) | "
        f"max rel diff {diff:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="test images for the top-k index")
    parser.add_argument("--k", type=int, default=9, help="hits per channel in the index")
    parser.add_argument("--data", type=Path, default=Path("var/data"), help="folder holding cifar-10-batches-py")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats of each batched pass (median)")
    parser.add_argument("--archs", nargs="*", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--layers", nargs="*", default=["conv1", "layer4"], choices=LAYER_NAMES)
    parser.add_argument("--topk-archs", nargs="*", default=list(ARCHS), choices=ARCHS, help="none: skip the index")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS), help="what the reverse timings measure")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, source = test_images(args.data, args.n)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); images: {source}; random weights; "
        f"{args.clock} time"
    )
    image = normalize(images[:1], INFO.mean, INFO.std)[0]
    models = {arch: build_model(arch).eval() for arch in ARCHS}
    for arch in args.archs:
        print(f"{arch}: one 32x32 image, deconvnet, shortcut=sum")
        for layer in args.layers:
            bench_reverse(models[arch], image, layer, args.repeat, CLOCKS[args.clock])
    for arch in args.topk_archs:
        fractions: list[float] = []
        t = time.perf_counter()
        index = build_topk_index(models[arch], images, INFO.mean, INFO.std, k=args.k, progress=fractions.append)
        dt = time.perf_counter() - t
        channels = sum(v.shape[0] for v in index.values.values())
        print(
            f"{arch}: top-{index.k} index over {args.n} images, {channels} channels in 5 layers: "
            f"{dt:.1f} s ({args.n / dt:.0f} images/s, {len(fractions)} progress updates)"
        )


if __name__ == "__main__":
    main()
