"""Drawing explanations: a heatmap in a colormap, blended over the upscaled input, and an every-method figure."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from models.errors import InvalidArgument
from models.explain import Explanation
from models.render import png_bytes

COLORMAPS = ("jet", "inferno", "viridis", "magma", "turbo", "hot", "gray")
DISPLAY = 128  # default displayed size (pixels, longer side): a 32x32 input is upscaled 4x
PAD, LABEL_H = 4, 26  # pixels between tiles; height of a tile's two label lines in the figure


@functools.cache
def _lut(name: str) -> torch.Tensor:
    """A matplotlib colormap as a (256, 3) float table, computed once per name."""
    from matplotlib import colormaps

    return torch.from_numpy(colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]).float()


def normalize_heatmap(heat: torch.Tensor) -> torch.Tensor:
    """(H, W) -> [0, 1] by min-max (as pytorch-grad-cam); a constant map is 1 where positive, else 0."""
    h = heat.detach().float().cpu()
    lo, hi = float(h.min()), float(h.max())
    # Float noise is not a range: a 1x1 map upsampled bilinearly varies in its last bits only.
    if hi - lo > 1e-6 * max(abs(hi), abs(lo), 1e-12):
        return (h - lo) / (hi - lo)
    # A 1x1 layer (layer4 at 32x32) gives a constant CAM: all equally important, or nothing.
    return torch.full_like(h, 1.0 if hi > 0 else 0.0)


def colorize(heat: torch.Tensor, cmap: str = "jet") -> torch.Tensor:
    """A heatmap (H, W) in [0, 1] -> RGB (3, H, W) in [0, 1] through a named colormap."""
    if cmap not in COLORMAPS:
        raise InvalidArgument(f"unknown colormap {cmap!r}; choose one of: {', '.join(COLORMAPS)}")
    idx = (heat.clamp(0, 1) * 255).round().long()
    return _lut(cmap)[idx].permute(2, 0, 1)


def _scale(h: int, w: int, size: int | None) -> int:
    return max(1, (size or DISPLAY) // max(h, w))


def _unit_image(image: torch.Tensor) -> torch.Tensor:
    """The unnormalised input, uint8 or float in [0, 1], (3, H, W) -> float (3, H, W) in [0, 1]."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise InvalidArgument(f"expected an image (3, H, W); got shape {tuple(image.shape)}")
    img = image.detach().cpu()
    return img.float() / 255 if img.dtype == torch.uint8 else img.float().clamp(0, 1)


def heatmap_tile(heat: torch.Tensor, cmap: str = "jet", size: int | None = None) -> torch.Tensor:
    """The heatmap alone (H, W) -> (3, s*H, s*W): normalised, upscaled bilinearly, coloured."""
    s = _scale(heat.shape[-2], heat.shape[-1], size)
    h = normalize_heatmap(heat)
    if s > 1:
        h = F.interpolate(h[None, None], scale_factor=s, mode="bilinear", align_corners=False)[0, 0]
    return colorize(h, cmap)


def overlay_tile(
    image: torch.Tensor, heat: torch.Tensor, cmap: str = "jet", alpha: float = 0.5, size: int | None = None
) -> torch.Tensor:
    """The heatmap blended over the input: (1 - alpha) * input (nearest upscale) + alpha * colour -> (3, sH, sW)."""
    if not 0 <= alpha <= 1:
        raise InvalidArgument(f"alpha must be in 0..1; got {alpha}")
    img = _unit_image(image)
    if img.shape[-2:] != heat.shape[-2:]:
        raise InvalidArgument(f"heatmap {tuple(heat.shape)} does not match the image {tuple(img.shape[-2:])}")
    s = _scale(img.shape[-2], img.shape[-1], size)
    # Nearest for the input: its pixels are the data; bilinear for the heatmap, a smooth field.
    big = img.repeat_interleave(s, -2).repeat_interleave(s, -1)
    return (1 - alpha) * big + alpha * heatmap_tile(heat, cmap, size)


def overlay_png(
    image: torch.Tensor, heat: torch.Tensor, cmap: str = "jet", alpha: float = 0.5, size: int | None = None
) -> bytes:
    """overlay_tile as PNG bytes."""
    return png_bytes(overlay_tile(image, heat, cmap, alpha, size))


def heatmap_png(heat: torch.Tensor, cmap: str = "jet", size: int | None = None) -> bytes:
    """heatmap_tile as PNG bytes."""
    return png_bytes(heatmap_tile(heat, cmap, size))


def figure_png(
    image: torch.Tensor,
    explanations: Mapping[str, Explanation],
    index: int = 0,
    class_names: Sequence[str] | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    size: int | None = None,
    heatmaps: bool = True,
) -> bytes:
    """Every method side by side for image `index` of the batch: the input, then one column per method
    (overlay above, the heatmap alone below when `heatmaps`), each labelled with the method and target."""
    if not explanations:
        raise InvalidArgument("nothing to draw: no explanations")
    img = _unit_image(image)
    s = _scale(img.shape[-2], img.shape[-1], size)
    th, tw = img.shape[-2] * s, img.shape[-1] * s
    columns: list[tuple[str, list[torch.Tensor]]] = [("input", [img.repeat_interleave(s, -2).repeat_interleave(s, -1)])]
    for name, e in explanations.items():
        heat = e.heatmap[index]
        t = e.targets[index]
        label = f"{name}\n{class_names[t] if class_names else f'class {t}'}"
        tiles = [overlay_tile(img, heat, cmap, alpha, size)] + ([heatmap_tile(heat, cmap, size)] if heatmaps else [])
        columns.append((label, tiles))
    rows = 1 + int(heatmaps)
    canvas = torch.ones(3, LABEL_H + PAD + rows * (th + PAD), len(columns) * (tw + PAD) + PAD)
    for c, (_, tiles) in enumerate(columns):
        for r, tile in enumerate(tiles):
            y, x = LABEL_H + PAD + r * (th + PAD), PAD + c * (tw + PAD)
            canvas[:, y : y + th, x : x + tw] = tile
    pil = Image.fromarray((canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    draw, font = ImageDraw.Draw(pil), ImageFont.load_default()
    for c, (label, _) in enumerate(columns):
        short = "\n".join(line[: max(4, tw // 6)] for line in label.split("\n"))  # ~6 px per character
        draw.multiline_text((PAD + c * (tw + PAD), PAD), short, fill=(0, 0, 0), font=font, spacing=2)
    return png_bytes(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
