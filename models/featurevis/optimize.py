"""The optimization of feature visualization: batched over channels, chunked, deterministic per image."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from models.device import use_bf16
from models.errors import InvalidArgument
from models.featurevis.image import (
    CIFAR10_COLOR_COV,
    FourierImage,
    Robustness,
    color_sqrt,
    model_input,
    robust_transform,
)
from models.featurevis.network import (
    OBJECTIVES,
    Objective,
    activation_values,
    diversity_penalty,
    layer_pre_relu,
    layer_width,
    memory_format,
    objective_values,
    optimization_copy,
)
from models.resnet import ResNet18, canonical_layer
from models.reverse import select_channels

DEFAULT_STEPS = 128  # the efficacy/speed trade-off measured by bench/featurevis.py
HISTORY_EVERY = 16  # the objective is recorded every this many steps
MAX_DIVERSITY = 8
LEARNING_RATE = 0.05  # Lucid's and Lucent's Adam default
DIVERSITY_WEIGHT = 0.5  # the penalty per unit of the group's (detached) mean objective
CHUNK_BYTES = 384 << 20  # CPU: images per chunk so that the activations autograd keeps stay near this


@dataclass
class FeatureVis:
    """Rendered images and the objective they reached; with diversity=k every per-channel field gains a k axis."""

    images: torch.Tensor  # (C, 3, H, W) or (C, k, 3, H, W), float32 RGB in [0, 1], CPU
    channels: list[int]
    layer: str
    objective: str
    diversity: int
    steps: int
    seed: int
    values: torch.Tensor  # (C,) or (C, k): the objective (pre-ReLU; maximized) of the returned images
    activation: torch.Tensor  # (C,) or (C, k): the post-ReLU mean (neuron: centre) of the returned images
    history: torch.Tensor  # (T, C) or (T, C, k): the objective at history_steps (the last one is `values`)
    history_steps: list[int] = field(default_factory=list)


def _check(model: ResNet18, objective: str, diversity: int, steps: int) -> None:
    if model.training:
        raise InvalidArgument("feature visualization needs the model in eval mode (BN with running statistics)")
    if objective not in OBJECTIVES:
        raise InvalidArgument(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    if diversity == 1 or not 0 <= diversity <= MAX_DIVERSITY:
        raise InvalidArgument(f"diversity must be 0 (off) or 2..{MAX_DIVERSITY}; got {diversity}")
    if steps < 1:
        raise InvalidArgument(f"steps must be at least 1; got {steps}")


def image_seed(seed: int, channel: int, copy: int) -> int:
    """The generator seed of one image: a function of (seed, channel, copy) alone, never of its batch."""
    return (seed * 1_000_003 + channel) * (MAX_DIVERSITY + 1) + copy


@dataclass
class _Setup:
    """What every chunk's optimization shares."""

    model: ResNet18  # as given: the returned images are measured on it, in float32
    net: ResNet18  # optimization_copy(model)
    layer: str
    objective: str
    diversity: int
    steps: int
    mean: Sequence[float]
    std: Sequence[float]
    image_size: int
    input_size: int
    color: torch.Tensor
    robustness: Robustness
    lr: float
    diversity_weight: float

    def pre_relu(self, images: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """[0, 1] images (any multiple of the native size) -> the layer's float32 pre-ReLU map."""
        x = model_input(images, self.mean, self.std, self.image_size, self.input_size)
        if exact:
            return layer_pre_relu(self.model, x, self.layer)
        p = next(self.net.parameters())
        return layer_pre_relu(self.net, x.to(p.dtype, memory_format=memory_format(p)), self.layer).float()


def _draw(seeds: list[int], setup: _Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, from its own generator: the initial spectrum (sd 0.01) and every step's transform parameters."""
    n = setup.image_size
    spectra, params = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        spectra.append(torch.randn(3, n, n // 2 + 1, 2, generator=g) * 0.01)
        params.append(torch.rand(setup.steps, 4, generator=g) * 2 - 1)
    return torch.stack(spectra), torch.stack(params, 1)  # (N, 3, n, n//2+1, 2), (steps, N, 4)


def _loss(setup: _Setup, image: FourierImage, params: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Minus the summed objectives of one transformed batch, plus the diversity penalty of each group of k."""
    z = setup.pre_relu(robust_transform(image(), params, setup.robustness))
    obj = objective_values(z, channels, setup.objective)
    loss = -obj.sum()
    k = setup.diversity
    if k > 1:
        # Relative to the group's own objective, so one weight suits every layer's scale of activations.
        scale = obj.detach().view(-1, k).mean(1).abs().clamp_min(1e-3)
        loss = loss + k * setup.diversity_weight * (scale * diversity_penalty(z, k)).sum()
    return loss


def _optimize(
    setup: _Setup, channels: list[int], seeds: list[int], tick: Callable[[int], None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's optimization; returns images, final objective, final activation and history (T, N)."""
    p = next(setup.model.parameters())
    spectrum, params = _draw(seeds, setup)
    image = FourierImage(spectrum, (setup.image_size,) * 2, setup.color).to(p.device)
    chan = torch.tensor(channels, device=p.device)
    params = params.to(p.device)
    opt = torch.optim.Adam([image.spectrum], lr=setup.lr)
    history = []
    with torch.enable_grad():
        for step in range(setup.steps):
            if step % HISTORY_EVERY == 0:
                with torch.no_grad():
                    history.append(objective_values(setup.pre_relu(image()), chan, setup.objective))
            (grad,) = torch.autograd.grad(_loss(setup, image, params[step], chan), [image.spectrum])
            image.spectrum.grad = grad
            opt.step()
            tick(len(seeds))
    with torch.no_grad():
        img = image()
        z = setup.pre_relu(img, exact=True)
    value, act = objective_values(z, chan, setup.objective), activation_values(z, chan, setup.objective)
    return img, value, act, torch.stack([*history, value])


def auto_chunk(model: ResNet18, input_size: int) -> int:
    """Images per optimization: on CPU as many as keep autograd's saved activations near CHUNK_BYTES, else 256."""
    p = next(model.parameters())
    if p.device.type != "cpu":
        return 256
    stride = 4 if isinstance(model.maxpool, nn.MaxPool2d) else 1
    # ~24 stem-sized (64-channel) float32 maps per image stay alive for the backward pass, whatever the layer.
    per_image = 24 * 64 * (input_size // stride) ** 2 * 4
    return max(1, min(256, CHUNK_BYTES // per_image))


def visualize(
    model: ResNet18,
    layer: str,
    channels: Literal["all"] | list[int],
    mean: Sequence[float],
    std: Sequence[float],
    input_size: int | None = None,
    image_size: int = 32,
    objective: Objective = "channel",
    diversity: int = 0,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    color_cov: torch.Tensor | Sequence[Sequence[float]] = CIFAR10_COLOR_COV,
    robustness: Robustness | None = None,
    chunk: int | None = None,
    progress: Callable[[float], None] | None = None,
    precision: Literal["bf16", "fp32"] = "bf16",
    lr: float = LEARNING_RATE,
    diversity_weight: float = DIVERSITY_WEIGHT,
) -> FeatureVis:
    """Render the images that maximize (or, `negative`, minimize) each chosen channel of a named layer.

    `channels`: "all" or a list of indices (a top-N needs an image, so it has no meaning here). `input_size`:
    the checkpoint's (default: image_size). `chunk`: images per optimization (default: auto_chunk); a diversity
    group never straddles two. `precision="bf16"`: the optimization runs under bf16 autocast where
    models.device.use_bf16 allows it (CUDA; a CPU with bf16 instructions), else in float32; the returned values
    are always measured in float32 on `model` itself. `progress(fraction)` is called after each step; raising aborts.
    """
    _check(model, objective, diversity, steps)
    if isinstance(channels, int) and not isinstance(channels, bool):
        raise InvalidArgument("a top-N channel choice ranks channels by an image's activation; give 'all' or a list")
    canon = canonical_layer(layer)
    p = next(model.parameters())
    rob = robustness or Robustness()
    size = input_size or image_size
    net = optimization_copy(model, use_bf16(p.device, precision), canon)
    setup = _Setup(
        model, net, canon, objective, diversity, steps, mean, std, image_size, size,
        color_sqrt(color_cov).to(p.device), rob, lr, diversity_weight,
    )  # fmt: skip
    chosen = select_channels(channels, torch.zeros(layer_width(model, canon)))
    k = max(diversity, 1)
    per = max(1, (chunk or auto_chunk(model, size)) // k)
    total, done = len(chosen) * k * steps, 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done / total)

    parts = []
    for start in range(0, len(chosen), per):
        group = chosen[start : start + per]
        seeds = [image_seed(seed, c, j) for c in group for j in range(k)]
        parts.append(_optimize(setup, [c for c in group for _ in range(k)], seeds, tick))
    return _result(parts, chosen, setup, seed)


def _result(parts: Sequence[tuple[torch.Tensor, ...]], chosen: list[int], setup: _Setup, seed: int) -> FeatureVis:
    """The chunks' outputs joined, shaped per channel (and per copy, with diversity)."""
    img, value, act, hist = (torch.cat([part[i] for part in parts], dim=1 if i == 3 else 0) for i in range(4))
    shape = (len(chosen), setup.diversity) if setup.diversity else (len(chosen),)
    marks = [*range(0, setup.steps, HISTORY_EVERY), setup.steps]
    return FeatureVis(
        img.float().cpu().reshape(*shape, *img.shape[1:]),
        chosen,
        setup.layer,
        setup.objective,
        setup.diversity,
        setup.steps,
        seed,
        value.float().cpu().reshape(shape),
        act.float().cpu().reshape(shape),
        hist.float().cpu().reshape(hist.shape[0], *shape),
        marks,
    )
