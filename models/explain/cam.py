"""The Grad-CAM family on the shared pass: each method is its channel weights (as in pytorch-grad-cam's BaseCAM)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from models.explain.base import Explanation, Pass, channel_max_abs, class_projection, upsample

Weights = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gradcam_weights(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Selvaraju et al.: each channel's weight is its gradient's spatial mean, (N, C, h, w) -> (N, C)."""
    return grad.mean((2, 3))


def gradcampp_weights(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Chattopadhyay et al.'s closed form for an exp(score) output: sum_ij alpha_ij relu(g_ij), (N, C).

    alpha = g^2 / (2 g^2 + sum_ab A_ab g^3); exp(score)'s derivatives are exp(score) times powers of g, and the
    common exp(score) factor is dropped (as pytorch-grad-cam does): it scales each image's map by a constant.
    """
    g2 = grad.pow(2)
    denom = 2 * g2 + act.sum((2, 3), keepdim=True) * g2 * grad
    # Where g = 0 the ratio is 0/0; the paper (and pytorch-grad-cam) set alpha to 0 there.
    ok = (grad != 0) & (denom != 0)
    alpha = torch.where(ok, g2 / torch.where(ok, denom, 1), 0)
    return (alpha * F.relu(grad)).sum((2, 3))


def class_activation_map(act: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ReLU of the weighted channel sum: (N, C, h, w), (N, C) -> (N, h, w) at the layer's resolution."""
    return F.relu(torch.einsum("nc,nchw->nhw", weights, act))


def _cam(p: Pass, method: str, weights_fn: Weights) -> Explanation:
    assert p.act_grad is not None, "the shared pass records the layer gradient for CAM methods"
    weights = weights_fn(p.act, p.act_grad)
    cam = class_activation_map(p.act, weights)
    heat = upsample(cam, (p.x.shape[-2], p.x.shape[-1]))
    extras = {"cam": cam, "weights": weights}
    return Explanation(method, heat, p.target_list, layer=p.layer, extras=extras)


def gradcam(p: Pass, prm: dict[str, Any]) -> Explanation:
    """Grad-CAM: heatmap = the upsampled CAM; extras `cam` (N, h, w) before upsampling, `weights` (N, C)."""
    return _cam(p, "gradcam", gradcam_weights)


def gradcampp(p: Pass, prm: dict[str, Any]) -> Explanation:
    """Grad-CAM++: as Grad-CAM with the second/third-order weights."""
    return _cam(p, "gradcampp", gradcampp_weights)


def guided_gradcam(p: Pass, prm: dict[str, Any]) -> Explanation:
    """Guided Grad-CAM: guided backprop of the target logit times the upsampled Grad-CAM, per pixel."""
    base = _cam(p, "gradcam", gradcam_weights)
    guided = class_projection(p, "guided", prm["shortcut"])
    attribution = guided * base.heatmap.unsqueeze(1)
    extras = {**base.extras, "gradcam": base.heatmap}
    return Explanation("guided_gradcam", channel_max_abs(attribution), p.target_list, attribution, p.layer, prm, extras)
