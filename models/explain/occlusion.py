"""Occlusion sensitivity (Zeiler & Fergus, section 4.2): a grey square slid over the image, all patches batched."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from models.errors import InvalidArgument
from models.explain.base import Explanation, Pass, target_logits
from models.hooks import LayerRecorder


def occlusion_grid(size: tuple[int, int], patch: int, stride: int) -> tuple[list[int], list[int]]:
    """The patches' top rows and left columns: every position where the whole patch fits, `stride` apart."""
    h, w = size
    if patch > min(h, w):
        raise InvalidArgument(f"occlusion.patch ({patch}) is larger than the {h}x{w} image")
    return list(range(0, h - patch + 1, stride)), list(range(0, w - patch + 1, stride))


def occlude(x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, patch: int) -> torch.Tensor:
    """Copies of x (B, 3, H, W) with a patch x patch square at (tops[b], lefts[b]) set to 0: the dataset mean,
    i.e. Zeiler-Fergus's grey, in normalised space."""
    rows = torch.arange(x.shape[-2], device=x.device)
    cols = torch.arange(x.shape[-1], device=x.device)
    in_rows = (rows >= tops[:, None]) & (rows < tops[:, None] + patch)
    in_cols = (cols >= lefts[:, None]) & (cols < lefts[:, None] + patch)
    inside = in_rows[:, :, None] & in_cols[:, None, :]
    return torch.where(inside.unsqueeze(1), 0, x)


def spread(values: torch.Tensor, size: tuple[int, int], patch: int, stride: int) -> torch.Tensor:
    """Per-position values (N, rows, cols) -> per pixel (N, H, W): the mean over the patches covering each
    pixel (0 where none does), as Captum's Occlusion does; a transposed conv with a box kernel adds them up."""
    box = values.new_ones(1, 1, patch, patch)
    total = F.conv_transpose2d(values.unsqueeze(1), box, stride=stride)
    count = F.conv_transpose2d(torch.ones_like(values[:1]).unsqueeze(1), box, stride=stride)
    pad = (0, size[1] - total.shape[-1], 0, size[0] - total.shape[-2])
    total, count = F.pad(total, pad), F.pad(count, pad)
    return (total / count.clamp_min(1)).squeeze(1)


def occlusion(p: Pass, prm: dict[str, Any]) -> Explanation:
    """Slide the grey patch; map the target's probability, the strongest feature map's activity and the top label.

    The feature map is the channel of `layer` with the highest activation on the unoccluded image; its activity is
    its max (`activity=max`) or total (`sum`, Zeiler-Fergus's figure 7b) activation. heatmap: the drop in the
    target's probability, averaged over the patches covering each pixel. Extras, each (N, rows, cols) with cell
    (i, j) the patch at top-left (i * stride, j * stride): `probability`, `activity`, `top_label`; and (N,):
    `base_probability`, `base_activity`, `channel`.
    """
    x, patch, stride, chunk = p.x, prm["patch"], prm["stride"], prm["chunk"]
    size = (x.shape[-2], x.shape[-1])
    tops, lefts = occlusion_grid(size, patch, stride)
    n, per_image = x.shape[0], len(tops) * len(lefts)
    grid_top = torch.tensor(tops, device=x.device).repeat_interleave(len(lefts))
    grid_left = torch.tensor(lefts, device=x.device).repeat(len(tops))
    channel = p.act.flatten(2).amax(2).argmax(1)
    reduce = (lambda a: a.amax(1)) if prm["activity"] == "max" else (lambda a: a.sum(1))

    prob, activity = x.new_empty(n * per_image), x.new_empty(n * per_image)
    top_label = torch.empty(n * per_image, dtype=torch.long, device=x.device)
    with torch.no_grad(), LayerRecorder(p.model, [p.layer]) as rec:
        for start in range(0, n * per_image, chunk):
            r = torch.arange(start, min(start + chunk, n * per_image), device=x.device)
            img, pos = r // per_image, r % per_image
            logits = p.model(occlude(x[img], grid_top[pos], grid_left[pos], patch))
            prob[r] = target_logits(logits.softmax(1), p.targets[img])
            top_label[r] = logits.argmax(1)
            act = rec.activations[p.layer]
            activity[r] = reduce(act[torch.arange(len(r), device=x.device), channel[img]].flatten(1))

    shape = (n, len(tops), len(lefts))
    base_prob = target_logits(p.logits.softmax(1), p.targets)
    base_activity = reduce(p.act[torch.arange(n, device=x.device), channel].flatten(1))
    heat = spread(base_prob.view(-1, 1, 1) - prob.view(shape), size, patch, stride)
    extras = {
        "probability": prob.view(shape),
        "activity": activity.view(shape),
        "top_label": top_label.view(shape),
        "base_probability": base_prob,
        "base_activity": base_activity,
        "channel": channel,
    }
    return Explanation("occlusion", heat, p.target_list, None, p.layer, prm, extras)
