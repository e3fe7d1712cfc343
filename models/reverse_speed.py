"""How the reverse network (models/reverse.py) runs fast: choices that change its time, never its result.

Every choice here is exact (tests/models/test_reverse.py checks the paths it picks against autograd in float64).
Each carries one line on why it pays; the timings behind the thresholds (A/B runs in one process) are in the
README's "Measured", the reasoning in docs/DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.errors import InvalidArgument

# Folding BN into a weight costs a pass over that weight, which only batches of this many signals repay.
FOLD_MIN_BATCH = 8
# Cutting a kernel to its live taps costs a copy of it, which only this many signal positions through it repay.
CUT_MIN_POSITIONS = 64
# On CPU, seeds per pass keep the widest signal (the stem's 64-channel map) this small: spilling the L3 cache
# slows the transposed convs more than a larger batch saves, and a smaller one runs no faster.
CHUNK_BYTES = 16 << 20
# Off CPU there is no such cache to fit: a fixed number of seeds per pass.
DEVICE_CHUNK = 256

Crop = tuple[tuple[int, int], tuple[int, int]]  # (first, last) kernel tap kept, per spatial dim


def transpose_padding(
    g: torch.Tensor, conv: nn.Conv2d, in_size: tuple[int, int], crop: Crop | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The padding and output_padding that make the conv's transpose of g (its kernel cut to `crop`) land on the
    forward input's (H, W); a cut kernel keeps every other tap in its place (the padding shrinks by the taps cut
    before it)."""
    padding, dilation, stride = conv.padding, conv.dilation, conv.stride
    if isinstance(padding, str):
        raise InvalidArgument("string padding cannot be reversed")
    k = tuple(conv.kernel_size) if crop is None else tuple(hi - lo + 1 for lo, hi in crop)
    if crop is not None:
        padding = tuple(padding[d] - crop[d][0] * dilation[d] for d in (0, 1))
    out_padding = tuple(
        in_size[d] - ((g.shape[-2 + d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (k[d] - 1) + 1) for d in (0, 1)
    )
    return tuple(padding), out_padding


def live_taps(conv: nn.Conv2d, g: torch.Tensor, in_size: tuple[int, int]) -> Crop | None:
    """The taps of the conv's kernel that carry some position of the signal g to the forward input, when that
    drops any: a map smaller than the kernel (the seed stem's 1x1 layer4 under 3x3 kernels) reaches the padding
    only through the outer taps. Tap t sends signal position i to input position i * stride + t * dilation -
    padding."""
    k, stride, padding, dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if isinstance(padding, str):
        return None
    ends = []
    for d in (0, 1):
        last = (g.shape[-2 + d] - 1) * stride[d]  # the last signal position, times the stride
        live = [t for t in range(k[d]) if last + t * dilation[d] >= padding[d] > t * dilation[d] - in_size[d]]
        ends.append((live[0], live[-1]) if live else (0, k[d] - 1))
    cut = (ends[0], ends[1])
    if cut == ((0, k[0] - 1), (0, k[1] - 1)):
        return None
    padding_cut, out_padding = transpose_padding(g, conv, in_size, cut)
    if min(padding_cut) < 0 or not all(0 <= out_padding[d] < max(stride[d], dilation[d]) for d in (0, 1)):
        return None  # not expressible as a transposed conv: keep the whole kernel
    return cut


def fold_and_cut(g: torch.Tensor, conv: nn.Conv2d, in_size: tuple[int, int]) -> tuple[bool, Crop | None]:
    """For (conv then BN)^T of g: whether BN runs folded into the weight, and the taps the kernel is cut to."""
    # A folded weight is made once per reverse network; it repays only against a signal larger than the weight
    # (not the seed stem's 1x1-4x4 maps, whose few values are cheaper to scale than their weights are to fold).
    fold = g.shape[0] >= FOLD_MIN_BATCH and g.numel() >= conv.weight.numel()
    # Unfolded, the kernel is still cut once enough positions pass through it that its dead taps cost more.
    cut = fold or g.shape[0] * g.shape[-2] * g.shape[-1] >= CUT_MIN_POSITIONS
    return fold, live_taps(conv, g, in_size) if cut else None


def prepared_weight(
    cache: dict[str, torch.Tensor],
    key: str,
    conv: nn.Conv2d,
    scale: Callable[[], torch.Tensor],
    fold: bool,
    crop: Crop | None,
) -> torch.Tensor:
    """The conv's weight with `scale()` (per output channel) folded in and/or cut to `crop`, made once in `cache`.

    Folding is exact: (g * scale) through the transposed conv equals g through it with weight * scale.
    """
    name = f"{key}{crop or ''}{'' if fold else ' unfolded'}"
    if name not in cache:
        w = conv.weight * scale().view(-1, 1, 1, 1) if fold else conv.weight
        cache[name] = w if crop is None else cut_kernel(w, crop)
    return cache[name]


def cut_kernel(w: torch.Tensor, crop: Crop) -> torch.Tensor:
    """A kernel cut to the taps `crop` keeps (a contiguous copy of that part only)."""
    return w[:, :, crop[0][0] : crop[0][1] + 1, crop[1][0] : crop[1][1] + 1].contiguous()


def fast_layout(g: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    """g in the memory format its transposed conv with weight w runs fastest in (the output keeps it)."""
    # oneDNN runs dense transposed convs faster channels-last, except a small signal beside its weight (a few seeds
    # on layer4's maps), which runs faster NCHW.
    if groups == 1 and ((g.shape[0] >= 16 and 4 * g.numel() >= w.numel()) or g.shape[-2] * g.shape[-1] >= 64):
        return g.contiguous(memory_format=torch.channels_last)
    return g


def auto_chunk(stem: torch.Tensor) -> int:
    """Seeds per reverse pass for a stem activation (N, 64, H, W): CHUNK_BYTES of signal on CPU, else DEVICE_CHUNK."""
    if stem.device.type != "cpu":
        return DEVICE_CHUNK
    return max(1, CHUNK_BYTES // (stem[0].numel() * stem.element_size()))


def live_seeds(values: torch.Tensor) -> torch.Tensor | None:
    """Indices of the seeds (K, h, w) that are not all zero, or None when all are live."""
    # The reverse network has no biases: an all-zero seed projects to exactly zero, so it need not run.
    live = values.flatten(1).any(1)
    return None if bool(live.all()) else live.nonzero().flatten()
