"""Rendering visual results to PNG / npy bytes and JSON-friendly values.

Every grid is laid out by `grid_shape` (as square as the count allows) and torchvision's `make_grid`, so each
`*_size` function states the exact (height, width) in pixels of what the matching `*_png` returns.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from models.errors import InvalidArgument
from models.visual import channel_stats

PAD = 2  # pixels between tiles
TARGET_TILE = 32  # small maps and filters are upscaled (nearest) to at least this many pixels
MAX_TILES = 16384  # beyond this a grid is unreadable and huge; callers must choose channels


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols): up to 4 tiles in one row, else cols = ceil(sqrt(n)), rows = ceil(n / cols)."""
    if n < 1:
        raise InvalidArgument("nothing to render: zero tiles")
    cols = n if n <= 4 else math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def grid_size(n: int, tile_h: int, tile_w: int, padding: int = PAD) -> tuple[int, int]:
    """(height, width) of make_grid's output for n tiles laid out by grid_shape (one tile: no padding)."""
    if n == 1:
        return tile_h, tile_w
    rows, cols = grid_shape(n)
    return rows * (tile_h + padding) + padding, cols * (tile_w + padding) + padding


def auto_scale(h: int, w: int, target: int = TARGET_TILE) -> int:
    """The integer nearest-neighbour upscale that brings a tile's longer side to at least ~target pixels."""
    return max(1, target // max(h, w))


def _grid(tiles: torch.Tensor, padding: int = PAD, pad_value: float = 1.0, **kw: Any) -> torch.Tensor:
    """Tiles (n, 3, h, w) in [0, 1] (or with make_grid's normalize kwargs) -> (3, H, W) grid."""
    if tiles.shape[0] > MAX_TILES:
        raise InvalidArgument(f"{tiles.shape[0]} tiles is too many to draw (limit {MAX_TILES}); choose fewer channels")
    _, cols = grid_shape(tiles.shape[0])
    return make_grid(tiles, nrow=cols, padding=padding, pad_value=pad_value, **kw)


def upscale(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest-neighbour upscaling of the last two dimensions by an integer factor."""
    return x if scale == 1 else x.repeat_interleave(scale, -2).repeat_interleave(scale, -1)


def _to_image(img: torch.Tensor) -> Image.Image:
    """(3, H, W) or (H, W) float in [0, 1] or uint8 -> a PIL image."""
    if img.is_floating_point():
        img = (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = img.cpu().numpy()
    arr = arr.transpose(1, 2, 0) if arr.ndim == 3 else arr
    return Image.fromarray(np.ascontiguousarray(arr))


def _encode(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Level 1: several times faster than the default 6 for a somewhat larger file, which latency favours.
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_bytes(img: torch.Tensor) -> bytes:
    """(3, H, W) or (H, W) float in [0, 1] or uint8 -> PNG bytes."""
    return _encode(_to_image(img))


def npy_bytes(t: torch.Tensor) -> bytes:
    """A tensor as .npy bytes, float32, same shape (the raw numbers for science)."""
    buf = io.BytesIO()
    np.save(buf, t.detach().to("cpu", torch.float32).numpy(), allow_pickle=False)
    return buf.getvalue()


@functools.cache
def _seismic_lut() -> torch.Tensor:
    """matplotlib's 'seismic' colormap (blue - white - red) as a (256, 3) float table, computed once."""
    from matplotlib import colormaps

    return torch.from_numpy(colormaps["seismic"](np.linspace(0.0, 1.0, 256))[:, :3]).float()


def seismic(x: torch.Tensor, m: float) -> torch.Tensor:
    """Values mapped symmetrically (vmin = -m, vmax = +m) to seismic RGB: (...) -> (..., 3) in [0, 1]."""
    m = m if m > 0 else 1.0
    idx = ((x.float() / m).clamp(-1, 1) * 127.5 + 127.5).round().long()
    return _seismic_lut()[idx]


def _filter_channels(weight: torch.Tensor, in_channels: Sequence[int] | None) -> list[int]:
    n = weight.shape[1]
    chosen = list(range(n)) if in_channels is None else [int(c) for c in in_channels]
    bad = [c for c in chosen if not 0 <= c < n]
    if not chosen or bad:
        raise InvalidArgument(f"input channels must be a non-empty list within 0..{n - 1}")
    return chosen


def filters_channels_size(
    weight_shape: Sequence[int], in_channels: Sequence[int] | None = None, scale: int | None = None, padding: int = PAD
) -> tuple[int, int]:
    """(height, width) of filters_channels_png for weights of this (out, in, kh, kw) shape."""
    out, n_in, kh, kw = weight_shape
    s = scale or auto_scale(kh, kw)
    ph, pw = grid_size(out, kh * s, kw * s, padding)
    return grid_size(n_in if in_channels is None else len(in_channels), ph, pw, 4 * padding)


def filters_channels_png(
    weight: torch.Tensor, in_channels: Sequence[int] | None = None, scale: int | None = None, padding: int = PAD
) -> bytes:
    """The seed's method 1 (after conviz): per input channel, a panel of every filter in the seismic map.

    One symmetric scale for the whole layer (vmin = -max|W|, vmax = +max|W|), so colours compare across panels.
    """
    chosen = _filter_channels(weight, in_channels)
    w = weight.detach().float().cpu()
    if w.shape[0] * len(chosen) > MAX_TILES:
        raise InvalidArgument(f"{w.shape[0]}x{len(chosen)} filter tiles is too many; choose fewer input channels")
    s = scale or auto_scale(w.shape[2], w.shape[3])
    m = float(w.abs().max())
    panels = []
    for c in chosen:
        tiles = upscale(seismic(w[:, c], m).permute(0, 3, 1, 2), s)  # (out, 3, kh*s, kw*s)
        panels.append(_grid(tiles, padding))
    return png_bytes(_grid(torch.stack(panels), 4 * padding))


def filters_rgb_size(weight_shape: Sequence[int], scale: int | None = None, padding: int = PAD) -> tuple[int, int]:
    """(height, width) of filters_rgb_png for weights of this (out, 3, kh, kw) shape."""
    out, _, kh, kw = weight_shape
    s = scale or auto_scale(kh, kw)
    return grid_size(out, kh * s, kw * s, padding)


def filters_rgb_png(weight: torch.Tensor, scale: int | None = None, padding: int = PAD) -> bytes:
    """The seed's method 2: each filter's three input channels fused as RGB, mid-grey = 0 (value_range=(-m, m))."""
    if weight.shape[1] != 3:
        raise InvalidArgument(
            f"RGB rendering needs a conv with 3 input channels (conv1); this one has {weight.shape[1]}"
        )
    w = weight.detach().float().cpu()
    s = scale or auto_scale(w.shape[2], w.shape[3])
    m = float(w.abs().max()) or 1.0
    return png_bytes(_grid(upscale(w, s), padding, normalize=True, value_range=(-m, m)))


def labelled_grid_png(tiles: torch.Tensor, labels: Sequence[str], scale: int = 1) -> bytes:
    """Tiles (n, 3, h, w) in [0, 1], upscaled nearest-neighbour by `scale`, on a grid, each labelled in a corner."""
    big = upscale(tiles, scale)
    return _label(_grid(big), labels, big.shape[-2], big.shape[-1], PAD)


def _label(grid: torch.Tensor, texts: Sequence[str], tile_h: int, tile_w: int, padding: int) -> bytes:
    """Write a small label in the top-left corner of each tile, then encode."""
    img = _to_image(grid)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    _, cols = grid_shape(len(texts))
    for i, text in enumerate(texts):
        r, c = divmod(i, cols)
        x, y = c * (tile_w + padding) + padding, r * (tile_h + padding) + padding
        if len(texts) == 1:
            x, y = 0, 0
        box = draw.textbbox((x, y), text, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 255, 0), font=font)
    return _encode(img)


def activation_grid_size(shape: Sequence[int], scale: int | None = None, padding: int = PAD) -> tuple[int, int]:
    """(height, width) of activation_grid_png for maps of this (C, h, w) shape."""
    c, h, w = shape
    s = scale or auto_scale(h, w)
    return grid_size(c, h * s, w * s, padding)


def activation_grid_png(
    act: torch.Tensor,
    labels: Sequence[str] | None = None,
    per_channel: bool = False,
    scale: int | None = None,
    padding: int = PAD,
) -> bytes:
    """Feature maps (C, h, w) as a grey grid, upscaled nearest-neighbour; one scale for all unless per_channel."""
    a = act.detach().float().cpu()
    flat = a.flatten(1)
    lo, hi = (
        (flat.amin(1), flat.amax(1)) if per_channel else (flat.min().expand(a.shape[0]), flat.max().expand(a.shape[0]))
    )
    a = (a - lo.view(-1, 1, 1)) / (hi - lo).clamp_min(1e-12).view(-1, 1, 1)
    s = scale or auto_scale(a.shape[1], a.shape[2])
    grid = _grid(upscale(a, s).unsqueeze(1).expand(-1, 3, -1, -1), padding)
    if labels is None:
        return png_bytes(grid)
    if len(labels) != a.shape[0]:
        raise InvalidArgument(f"{len(labels)} labels for {a.shape[0]} maps")
    return _label(grid, labels, a.shape[1] * s, a.shape[2] * s, padding)


def display_projection(p: torch.Tensor) -> torch.Tensor:
    """A projection (..., 3, H, W) for display: 0.5 + p / (2 max|p|) each, so zero is mid-grey and sign shows."""
    m = p.detach().float().abs().flatten(-3).amax(-1).clamp_min(1e-12)
    return (0.5 + p.detach().float() / (2 * m[..., None, None, None])).clamp(0, 1)


def projection_grid_size(
    k: int, height: int, width: int, with_image: bool = True, scale: int | None = None, padding: int = PAD
) -> tuple[int, int]:
    """(height, width) of projection_grid_png for k projections of (3, height, width) (+1 tile for the input)."""
    s = scale or auto_scale(height, width)
    return grid_size(k + int(with_image), height * s, width * s, padding)


def projection_grid_png(
    projections: torch.Tensor,
    image: torch.Tensor | None = None,
    labels: Sequence[str] | None = None,
    scale: int | None = None,
    padding: int = PAD,
) -> bytes:
    """The input (uint8 or [0, 1], unnormalised) first, then each projection (K, 3, H, W), normalised alone."""
    tiles = display_projection(projections.cpu())
    if image is not None:
        shown = image.detach().cpu().float() / 255 if image.dtype == torch.uint8 else image.detach().cpu().float()
        tiles = torch.cat([shown.view(1, *tiles.shape[1:]), tiles])
        labels = None if labels is None else ["input", *labels]
    s = scale or auto_scale(tiles.shape[2], tiles.shape[3])
    grid = _grid(upscale(tiles, s), padding)
    if labels is None:
        return png_bytes(grid)
    if len(labels) != tiles.shape[0]:
        raise InvalidArgument(f"{len(labels)} labels for {tiles.shape[0]} tiles")
    return _label(grid, labels, tiles.shape[2] * s, tiles.shape[3] * s, padding)


def stats_json(act: torch.Tensor) -> dict[str, Any]:
    """Per-channel statistics of (C, h, w) as JSON-ready lists (argmax as [row, col])."""
    st = channel_stats(act)
    out: dict[str, Any] = {k: getattr(st, k).tolist() for k in ("min", "max", "mean", "std", "active")}
    out["argmax"] = [[int(r), int(c)] for r, c in zip(st.argmax_row.tolist(), st.argmax_col.tolist(), strict=True)]
    return out


def tensor_json(t: torch.Tensor, stats: bool = True) -> dict[str, Any]:
    """{"shape", "dtype": "float32", "values" (nested lists), "stats" (per channel, for (C, h, w))}."""
    v = t.detach().to("cpu", torch.float32)
    out: dict[str, Any] = {"shape": list(v.shape), "dtype": "float32", "values": v.tolist()}
    if stats and v.dim() == 3:
        out["stats"] = stats_json(v)
    return out


def topk_size(k: int, tile: int, padding: int = PAD) -> tuple[int, int]:
    """(height, width) of topk_png: two rows of k tiles."""
    return 2 * (tile + padding) + padding, k * (tile + padding) + padding


def topk_png(
    patches: Sequence[torch.Tensor], projections: Sequence[torch.Tensor], tile: int, padding: int = PAD
) -> bytes:
    """Zeiler-Fergus figure 2 for one channel: its top hits' projections (top row) above their image patches.

    Each entry is (3, h, w) cut to the hit's receptive field: patches in [0, 1], projections raw (each shown
    with display_projection: zero is mid-grey). Every tile is resized (nearest) to `tile` x `tile`.
    """
    if len(patches) != len(projections) or not patches:
        raise InvalidArgument(
            f"need as many projections as patches (at least one); got {len(projections)}/{len(patches)}"
        )

    def fit(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(t[None].float(), size=(tile, tile), mode="nearest")[0]

    top = [fit(display_projection(p)) for p in projections]
    bottom = [fit(p.float().clamp(0, 1)) for p in patches]
    grid = make_grid(torch.stack(top + bottom), nrow=len(patches), padding=padding, pad_value=1.0)
    return png_bytes(grid)


def confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str = "") -> bytes:
    """A confusion matrix (rows: true class, columns: predicted) as a labelled heatmap with counts, row-normalised."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    m = np.asarray(confusion, dtype=np.float64)
    n = len(classes)
    if m.shape != (n, n):
        raise InvalidArgument(f"confusion matrix {m.shape} does not match {n} classes")
    rates = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = max(4.0, 0.55 * n + 2)
    fig = Figure(figsize=(size, size * 0.9), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=45, ha="right")
    ax.set_yticks(range(n), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{int(m[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
