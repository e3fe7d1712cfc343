"""Input-space attributions: saliency, SmoothGrad, integrated gradients, and the reverse network's projections."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from models.explain.base import Explanation, Pass, channel_max_abs, class_projection, target_logits
from models.resnet import ResNet18

# (image index, sample index) per row -> the inputs of those rows.
MakeInputs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gradient_sum(
    model: ResNet18, n: int, per_image: int, make: MakeInputs, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Sum over each image's `per_image` inputs of d target logit / d input -> (n, 3, H, W), `chunk` rows a pass."""
    total: torch.Tensor | None = None
    rows = n * per_image
    for start in range(0, rows, chunk):
        r = torch.arange(start, min(start + chunk, rows), device=targets.device)
        img, k = r // per_image, r % per_image
        inputs = make(img, k).detach().requires_grad_(True)
        with torch.enable_grad():
            score = target_logits(model(inputs), targets[img]).sum()
            (grad,) = torch.autograd.grad(score, inputs)
        if total is None:
            total = grad.new_zeros(n, *grad.shape[1:])
        total.index_add_(0, img, grad)
    assert total is not None
    return total


def saliency(p: Pass, prm: dict[str, Any]) -> Explanation:
    """Simonyan et al.: attribution = d target logit / d input; heatmap = its max |value| over colour channels."""
    assert p.input_grad is not None, "the shared pass records the input gradient for saliency"
    return Explanation("saliency", channel_max_abs(p.input_grad), p.target_list, p.input_grad, params=prm)


def smoothgrad(p: Pass, prm: dict[str, Any]) -> Explanation:
    """Smilkov et al.: the mean gradient over `samples` noisy copies, noise std = sigma * the image's value range.

    The noise pattern is drawn once from `seed` and shared by every image (scaled by each image's range), so an
    image's result does not depend on the batch it came in. Extras: `noise_std` (N,).
    """
    x, n = p.x, prm["samples"]
    gen = torch.Generator().manual_seed(prm["seed"])
    # Drawn in float64 on the CPU, so the noise is the same whatever the model's dtype or device.
    noise = torch.randn((n, *x.shape[1:]), generator=gen, dtype=torch.float64).to(x)
    std = prm["sigma"] * (x.amax((1, 2, 3)) - x.amin((1, 2, 3)))

    def make(img: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return x[img] + std[img].view(-1, 1, 1, 1) * noise[k]

    attribution = gradient_sum(p.model, x.shape[0], n, make, p.targets, prm["chunk"]) / n
    return Explanation(
        "smoothgrad", channel_max_abs(attribution), p.target_list, attribution, params=prm, extras={"noise_std": std}
    )


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), edges replicated, kernel radius ceil(3 sigma)."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ig_baseline(
    x: torch.Tensor, kind: str, mean: tuple[float, ...], std: tuple[float, ...], blur_sigma: float
) -> torch.Tensor:
    """The IG baseline in normalised space: `black` = an all-zero-pixel image normalised, i.e. -mean/std per
    channel; `mean` = 0 (the dataset-mean grey); `blur` = a Gaussian-blurred copy of the image."""
    if kind == "blur":
        return gaussian_blur(x, blur_sigma)
    if kind == "mean":
        return torch.zeros_like(x)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)
    s = torch.tensor(std, dtype=x.dtype, device=x.device)
    return (-m / s).view(1, -1, 1, 1).expand_as(x).clone()


def integrated_gradients(p: Pass, prm: dict[str, Any]) -> Explanation:
    """Sundararajan et al., midpoint Riemann sum over `steps` points of the straight path baseline -> image.

    attribution = (x - x0) * mean gradient. Extras: `score` F(x) and `baseline_score` F(x0) (target logits),
    `completeness_error` |sum(attribution) - (F(x) - F(x0))| and `relative_error` (that over |F(x) - F(x0)|),
    each (N,), and `baseline` (N, 3, H, W).
    """
    x, steps = p.x, prm["steps"]
    x0 = ig_baseline(x, prm["baseline"], p.mean, p.std, prm["blur_sigma"])
    delta = x - x0
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5).div(steps).to(x)

    def make(img: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return x0[img] + alphas[k].view(-1, 1, 1, 1) * delta[img]

    attribution = delta * gradient_sum(p.model, x.shape[0], steps, make, p.targets, prm["chunk"]) / steps
    with torch.no_grad():
        base_score = target_logits(p.model(x0), p.targets)
    score = target_logits(p.logits, p.targets)
    error = (attribution.sum((1, 2, 3)) - (score - base_score)).abs()
    extras = {
        "score": score,
        "baseline_score": base_score,
        "completeness_error": error,
        "relative_error": error / (score - base_score).abs().clamp_min(torch.finfo(x.dtype).tiny),
        "baseline": x0,
    }
    return Explanation(
        "integrated_gradients", channel_max_abs(attribution), p.target_list, attribution, None, prm, extras
    )


def deconvnet(p: Pass, prm: dict[str, Any]) -> Explanation:
    """Zeiler-Fergus deconvnet projection of the target logit to the input (models.reverse, rule=deconvnet)."""
    proj = class_projection(p, "deconvnet", prm["shortcut"])
    return Explanation("deconvnet", channel_max_abs(proj), p.target_list, proj, params=prm)


def guided_backprop(p: Pass, prm: dict[str, Any]) -> Explanation:
    """Springenberg et al.'s guided backprop of the target logit (models.reverse, rule=guided)."""
    proj = class_projection(p, "guided", prm["shortcut"])
    return Explanation("guided_backprop", channel_max_abs(proj), p.target_list, proj, params=prm)
