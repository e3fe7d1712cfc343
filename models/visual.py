"""Visual math: filters, activations, per-channel statistics, receptive fields and the top-k examples index."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from models.checkpoints import atomic_write_bytes, atomic_write_json, weights_path
from models.data import normalize
from models.errors import CheckpointError, InvalidArgument
from models.hooks import record_activations
from models.resnet import LAYER_NAMES, ResNet18, canonical_layer, conv_layer
from models.reverse import Rule, Shortcut, as_batch, project_positions

INDEX_VERSION = 1


def filters(model: nn.Module, layer: str) -> torch.Tensor:
    """A conv layer's weights (out, in, kh, kw) as a detached float32 CPU copy; `layer` as in conv_layer."""
    return conv_layer(model, layer).weight.detach().to("cpu", torch.float32).clone()


def feature_maps(model: ResNet18, image: torch.Tensor, layer: str) -> torch.Tensor:
    """A named layer's activation (C, h, w) for one normalised image (3, H, W)."""
    x = as_batch(model, image)
    canon = canonical_layer(layer)
    return record_activations(model, x, [canon])[canon][0]


@dataclass
class ChannelStats:
    """Per-channel statistics of an activation (C, h, w); every field has shape (C,)."""

    min: torch.Tensor
    max: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    active: torch.Tensor  # fraction of positions > 0
    argmax_row: torch.Tensor
    argmax_col: torch.Tensor


def channel_stats(act: torch.Tensor) -> ChannelStats:
    """Min, max, mean, std, fraction active and the strongest position of each channel of (C, h, w)."""
    flat = act.detach().flatten(1).float()
    pos = flat.argmax(1)
    w = act.shape[-1]
    return ChannelStats(
        min=flat.amin(1),
        max=flat.amax(1),
        mean=flat.mean(1),
        std=flat.std(1, unbiased=False),
        active=(flat > 0).float().mean(1),
        argmax_row=pos // w,
        argmax_col=pos % w,
    )


def _conv_path(model: ResNet18, layer: str) -> list[tuple[int, int, int]]:
    """(kernel, stride, padding) along the longest path to a named layer's output (the residual branches)."""
    canon = canonical_layer(layer)
    ops = [(model.conv1.kernel_size[0], model.conv1.stride[0], _pad(model.conv1.padding))]
    if canon == "conv1":
        return ops
    if isinstance(model.maxpool, nn.MaxPool2d):
        p = model.maxpool
        ops.append((_int(p.kernel_size), _int(p.stride), _int(p.padding)))
    for stage in LAYER_NAMES[1 : LAYER_NAMES.index(canon) + 1]:
        for block in getattr(model, stage):
            for conv in (block.conv1, block.conv2):
                ops.append((conv.kernel_size[0], conv.stride[0], _pad(conv.padding)))
    return ops


def _int(v: Any) -> int:
    return int(v if isinstance(v, int) else v[0])


def _pad(v: Any) -> int:
    if isinstance(v, str):
        raise InvalidArgument("string padding has no fixed receptive field")
    return _int(v)


def receptive_field(
    model: ResNet18, layer: str, row: int, col: int, height: int, width: int
) -> tuple[int, int, int, int]:
    """The input box (top, left, bottom, right; bottom/right exclusive) a position of a layer sees, clipped."""
    jump, size, offset = 1, 1, 0  # position i covers input [i*jump + offset, i*jump + offset + size)
    for k, s, p in _conv_path(model, layer):
        offset -= p * jump
        size += (k - 1) * jump
        jump *= s
    top, left = row * jump + offset, col * jump + offset
    return max(top, 0), max(left, 0), min(top + size, height), min(left + size, width)


@dataclass
class Hit:
    """One top-k entry: the activation value, which image, and where in the layer's map."""

    value: float
    image: int
    row: int
    col: int


@dataclass
class TopKIndex:
    """For each named layer: (C, k) tensors of the k strongest activations over a dataset, strongest first.

    Each channel's k hits come from k different images, each at that image's strongest position.
    """

    k: int
    num_images: int
    values: dict[str, torch.Tensor]  # layer -> (C, k) float32
    images: dict[str, torch.Tensor]  # layer -> (C, k) int64 image index
    rows: dict[str, torch.Tensor]  # layer -> (C, k) int64
    cols: dict[str, torch.Tensor]  # layer -> (C, k) int64
    meta: dict[str, Any] = field(default_factory=dict)  # what the caller records: checkpoint sha, dataset, split

    def hits(self, layer: str, channel: int) -> list[Hit]:
        """The k hits of one channel, strongest first."""
        canon = canonical_layer(layer)
        if canon not in self.values:
            raise InvalidArgument(f"layer {canon!r} is not in this index; it holds {', '.join(self.values)}")
        n = self.values[canon].shape[0]
        if not 0 <= channel < n:
            raise InvalidArgument(f"channel {channel} is out of range; valid channels are 0..{n - 1}")
        v, i, r, c = (t[canon][channel].tolist() for t in (self.values, self.images, self.rows, self.cols))
        return [Hit(float(a), int(b), int(d), int(e)) for a, b, d, e in zip(v, i, r, c, strict=True)]


def build_topk_index(
    model: ResNet18,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    k: int = 9,
    layers: Sequence[str] = LAYER_NAMES,
    batch_size: int = 250,
    progress: Callable[[float], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> TopKIndex:
    """One pass over uint8 images (N, 3, H, W): each channel's k strongest images of every named layer.

    `progress(fraction)` is called after each batch; a callback that raises aborts the build.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise InvalidArgument(
            f"expected uint8 images (N, 3, H, W) with N > 0; got {images.dtype} {tuple(images.shape)}"
        )
    if k < 1 or batch_size < 1:
        raise InvalidArgument(f"k and batch_size must be positive; got k={k}, batch_size={batch_size}")
    if model.training:
        raise InvalidArgument("build the index with the model in eval mode")
    canon = list(dict.fromkeys(canonical_layer(n) for n in layers))
    n = images.shape[0]
    k = min(k, n)
    p = next(model.parameters())
    best: dict[str, tuple[torch.Tensor, ...]] = {}
    for start in range(0, n, batch_size):
        x = normalize(images[start : start + batch_size].to(p.device), tuple(mean), tuple(std)).to(p.dtype)
        acts = record_activations(model, x, canon)
        for name in canon:
            best[name] = _merge(best.get(name), acts[name], start, k)
        if progress:
            progress(min(start + batch_size, n) / n)
    vals, imgs, rows, cols = ({name: best[name][j] for name in canon} for j in range(4))
    return TopKIndex(k, n, vals, imgs, rows, cols, dict(meta or {}))


def _merge(prev: tuple[torch.Tensor, ...] | None, act: torch.Tensor, start: int, k: int) -> tuple[torch.Tensor, ...]:
    """Merge a batch's per-image maxima (B, C, h, w) into the running (C, k) bests."""
    b, c, _, w = act.shape
    v, pos = act.detach().flatten(2).max(2)  # (B, C): each image's strongest position per channel
    cand: tuple[torch.Tensor, ...] = (
        v.t().float().cpu(),
        (torch.arange(b) + start).expand(c, b),
        (pos // w).t().cpu(),
        (pos % w).t().cpu(),
    )
    if prev is not None:
        cand = tuple(torch.cat([old, new], 1) for old, new in zip(prev, cand, strict=True))
    # Stable sort with earlier images first: ties resolve to the lower image index, deterministically.
    order = torch.sort(cand[0], dim=1, descending=True, stable=True).indices[:, :k]
    return tuple(t.gather(1, order).contiguous() for t in cand)


def topk_index_stem(checkpoint_stem: Path) -> Path:
    """Where a checkpoint's index lives: `checkpoints/topk/<name>` (a subfolder, out of the epoch-* globs)."""
    wpath = weights_path(Path(checkpoint_stem))
    return wpath.parent / "topk" / wpath.stem


def save_topk_index(index: TopKIndex, stem: Path) -> None:
    """Write `<stem>.safetensors` then `<stem>.json` (the JSON, written last, marks the index complete)."""
    tensors = {
        f"{layer}.{part}": getattr(index, part)[layer].contiguous()
        for layer in index.values
        for part in ("values", "images", "rows", "cols")
    }
    data = save_safetensors(tensors)
    wpath = Path(f"{stem}.safetensors")
    atomic_write_bytes(wpath, data)
    atomic_write_json(
        Path(f"{stem}.json"),
        {
            "version": INDEX_VERSION,
            "k": index.k,
            "num_images": index.num_images,
            "layers": list(index.values),
            "meta": index.meta,
            "weights": wpath.name,
            "sha256": hashlib.sha256(data).hexdigest(),
        },
    )


def topk_index_exists(stem: Path) -> bool:
    """Whether a complete index (its JSON) is there."""
    return Path(f"{stem}.json").is_file()


def load_topk_index(stem: Path) -> TopKIndex:
    """Read an index written by save_topk_index, verifying its sha256; problems are CheckpointErrors."""
    jpath, wpath = Path(f"{stem}.json"), Path(f"{stem}.safetensors")
    try:
        info = json.loads(jpath.read_text())
        data = wpath.read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"top-k index {e.filename} is missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"top-k index {jpath} is corrupted: {e}") from e
    if hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise CheckpointError(f"top-k index {wpath} is corrupted or was replaced (sha256 mismatch); rebuild it")
    t = load_safetensors(data)
    parts = {
        part: {layer: t[f"{layer}.{part}"] for layer in info["layers"]} for part in ("values", "images", "rows", "cols")
    }
    return TopKIndex(int(info["k"]), int(info["num_images"]), meta=dict(info.get("meta", {})), **parts)


def image_patch(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The part of an image (..., H, W) inside a receptive-field box (top, left, bottom, right)."""
    top, left, bottom, right = box
    return image[..., top:bottom, left:right]


def hit_projections(
    model: ResNet18,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    layer: str,
    channel: int,
    hits: Sequence[Hit],
    rule: Rule = "deconvnet",
    shortcut: Shortcut = "sum",
) -> torch.Tensor:
    """Argmax-seeded projections (K, 3, H, W) of a channel's hits, one batched pass; `images` is the uint8 dataset."""
    x = normalize(images[torch.tensor([h.image for h in hits])], tuple(mean), tuple(std))
    return project_positions(model, x, layer, channel, [(h.row, h.col) for h in hits], rule, shortcut)
