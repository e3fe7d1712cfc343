"""The one entry point: validate, one shared forward (and backward), then each method's small function."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from models.data import DATASETS
from models.errors import InvalidArgument
from models.explain.base import Explanation, Pass, target_logits
from models.explain.cam import gradcam, gradcampp, guided_gradcam
from models.explain.gradients import deconvnet, guided_backprop, integrated_gradients, saliency, smoothgrad
from models.explain.occlusion import occlusion
from models.explain.params import ALIASES, check_target, resolve_methods, resolve_params
from models.hooks import LayerRecorder
from models.resnet import ResNet18, canonical_layer

Method = Callable[[Pass, dict[str, Any]], Explanation]
RUNNERS: dict[str, Method] = {
    "gradcam": gradcam,
    "gradcampp": gradcampp,
    "guided_gradcam": guided_gradcam,
    "saliency": saliency,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "occlusion": occlusion,
    "deconvnet": deconvnet,
    "guided_backprop": guided_backprop,
}
CAM_METHODS = ("gradcam", "gradcampp", "guided_gradcam")  # need d score / d layer from the shared backward
CIFAR10 = DATASETS["cifar10"]


@contextmanager
def eval_mode(model: ResNet18) -> Iterator[None]:
    """Eval mode (BN on running statistics) for the call; the modules that were training are switched back after.

    Parameters are left alone: autograd.grad with explicit inputs computes no weight gradients and accumulates
    none, and an eval model is not mutated at all, so concurrent calls on a shared served model are safe.
    """
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


def _check_images(model: ResNet18, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float -> a private copy on the model's device and dtype (never an inference tensor)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidArgument(f"images must be normalised (N, 3, H, W) with N >= 1; got {shape}")
    if not images.is_floating_point():
        raise InvalidArgument(f"images must be normalised floats, not {images.dtype}")
    q = next(model.parameters())
    return images.detach().to(device=q.device, dtype=q.dtype).clone()


def shared_pass(
    model: ResNet18,
    x: torch.Tensor,
    layer: str,
    target: list[int] | None,
    need_layer_grad: bool,
    need_input_grad: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Pass:
    """One forward recording `layer`; then, if asked, one backward of the target logits to the layer and input."""
    grads = need_layer_grad or need_input_grad
    xin = x.detach().requires_grad_(grads)
    with torch.set_grad_enabled(grads), LayerRecorder(model, [layer], detach=not grads) as rec:
        logits = model(xin)
        act = rec.activations[layer]
    targets = logits.detach().argmax(1) if target is None else torch.tensor(target, device=x.device)
    act_grad = input_grad = None
    if grads:
        # The sum's gradient is each image's own: in eval mode the images of a batch do not interact.
        inputs = ([act] if need_layer_grad else []) + ([xin] if need_input_grad else [])
        found = list(torch.autograd.grad(target_logits(logits, targets).sum(), inputs))
        act_grad = found.pop(0) if need_layer_grad else None
        input_grad = found.pop(0) if need_input_grad else None
    return Pass(model, x, layer, logits.detach(), targets, act.detach(), act_grad, input_grad, mean, std)


def explain(
    model: ResNet18,
    images: torch.Tensor,
    methods: Sequence[str],
    target: int | Sequence[int] | None = None,
    layer: str = "layer4",
    params: Mapping[str, Mapping[str, Any]] | None = None,
    mean: Sequence[float] = CIFAR10.mean,
    std: Sequence[float] = CIFAR10.std,
) -> dict[str, Explanation]:
    """Explain normalised images (N, 3, H, W) with several methods sharing one forward (and one backward).

    `target`: None (each image's predicted class), one class index for all, or one per image. `layer`: a named
    layer or alias, used by the CAM methods and occlusion. `params`: per method (see PARAMS). `mean`/`std`: the
    model's normalisation (its checkpoint metadata), used by the integrated-gradients `black` baseline.
    Returns {method: Explanation} in the order asked. Raises InvalidArgument / UnknownLayer naming the field.
    """
    names = resolve_methods(methods)
    params = {ALIASES.get(k, k): v for k, v in (params or {}).items()}
    stray = sorted(set(params) - set(names))
    if stray:
        raise InvalidArgument(f"params given for {stray[0]!r}, which is not among the methods asked: {names}")
    resolved = {m: resolve_params(m, params.get(m)) for m in names}
    canon = canonical_layer(layer)
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise InvalidArgument("mean and std must have 3 values each, std > 0")
    # Inference tensors (a caller under torch.inference_mode) cannot enter autograd: work on an ordinary copy.
    with torch.inference_mode(False), eval_mode(model):
        x = _check_images(model, images)
        chosen = check_target(target, x.shape[0], model.fc.out_features)
        p = shared_pass(
            model,
            x,
            canon,
            chosen,
            need_layer_grad=any(m in CAM_METHODS for m in names),
            need_input_grad="saliency" in names,
            mean=tuple(mean),
            std=tuple(std),
        )
        found = {m: RUNNERS[m](p, resolved[m]) for m in names}
    probs = torch.softmax(p.logits, dim=1)  # the forward every method shared: no second one needed
    for e in found.values():
        e.probabilities = probs
    return found
