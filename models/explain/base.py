"""What every method shares: the result type, the shared pass's record, and small tensor helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from models.resnet import ResNet18
from models.reverse import ForwardRecord, ReverseResNet, Rule, Shortcut


@dataclass
class Explanation:
    """One method's result for a batch of N images; tensors are detached, in the model's dtype and device."""

    method: str
    heatmap: torch.Tensor  # (N, H, W) on the input grid; larger = more important (occlusion: probability drop)
    targets: list[int]  # the class explained, per image
    attribution: torch.Tensor | None = None  # (N, 3, H, W) in the normalised input space, where the method has one
    layer: str | None = None  # canonical layer name, for the methods that use one
    params: dict[str, Any] = field(default_factory=dict)  # the parameters used, defaults filled in
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # method-specific values, documented per method
    probabilities: torch.Tensor | None = None  # (N, classes): softmax of the logits of the forward all methods share


@dataclass
class Pass:
    """What the shared forward (and backward) leaves for the methods; the reverse record is made on demand."""

    model: ResNet18
    x: torch.Tensor  # (N, 3, H, W), normalised, detached
    layer: str
    logits: torch.Tensor  # (N, classes), detached
    targets: torch.Tensor  # (N,) int64
    act: torch.Tensor  # the layer's activation (N, C, h, w), detached
    act_grad: torch.Tensor | None  # d target logit / d act, when a CAM method asked for it
    input_grad: torch.Tensor | None  # d target logit / d x, when saliency asked for it
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rec: ForwardRecord | None = None
    projections: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    @property
    def target_list(self) -> list[int]:
        """The targets as Python ints."""
        return [int(t) for t in self.targets]


def channel_max_abs(attribution: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, H, W): the largest |value| over colour channels (Simonyan et al.'s saliency map)."""
    return attribution.abs().amax(1)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W), bilinear with half-pixel centres (as cv2.resize in pytorch-grad-cam)."""
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def target_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, classes), (N,) -> (N,): each row's target logit, the score every gradient method differentiates."""
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


def class_projection(p: Pass, rule: Rule, shortcut: Shortcut) -> torch.Tensor:
    """The reverse network's projection of each image's target logit to the input (N, 3, H, W), cached per rule.

    Batched over images: one recorded forward, then one reverse pass with a one-hot seed per image.
    """
    key = (rule, shortcut)
    if key not in p.projections:
        rev = ReverseResNet(p.model)
        with torch.no_grad():
            if p.rec is None:
                p.rec = rev.record(p.x)
            seeds = F.one_hot(p.targets, p.logits.shape[1]).to(p.x.dtype)
            p.projections[key] = rev(seeds, p.rec, "logits", rule, shortcut)
    return p.projections[key]
