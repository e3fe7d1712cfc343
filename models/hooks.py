"""A hook recorder for named layers that always releases its hooks (after pytorch-grad-cam's recorder)."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from models.resnet import ResNet18, canonical_layer, layer_module


class LayerRecorder:
    """Context manager recording named layers' outputs (and, optionally, the gradients flowing into them).

    Keys are canonical names (`conv5_x` is recorded as `layer4`). Every hook is removed on exit, even when
    the body raises; a recorder can be entered again, and each entry starts empty.
    """

    def __init__(self, model: ResNet18, layers: Iterable[str], gradients: bool = False, detach: bool = True) -> None:
        self.model = model
        self.layers = list(dict.fromkeys(canonical_layer(n) for n in layers))
        self.want_gradients = gradients
        self.detach = detach
        self.activations: dict[str, torch.Tensor] = {}
        self.gradients: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def _forward_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.activations[name] = output.detach() if self.detach else output
            if self.want_gradients and output.requires_grad:
                # The hook closes over the dict, not self: self -> output -> hook -> self would be a cycle
                # through autograd's C++ hook list, which Python's gc cannot see, so it would never be freed.
                grads = self.gradients
                output.register_hook(lambda grad: grads.__setitem__(name, grad.detach()))

        return hook

    def __enter__(self) -> LayerRecorder:
        self.activations, self.gradients = {}, {}
        try:
            for name in self.layers:
                module = layer_module(self.model, name)
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def release(self) -> None:
        """Remove every hook this recorder registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def record_activations(model: ResNet18, images: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
    """One no-grad forward of normalised images (N, 3, H, W); returns each named layer's (N, C, h, w) output."""
    with torch.no_grad(), LayerRecorder(model, layers) as rec:
        model(images)
    return rec.activations


def count_hooks(model: nn.Module) -> int:
    """How many module hooks are registered anywhere in the model (for leak checks)."""
    total = 0
    for m in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
        ):
            total += len(getattr(m, attr, {}))
    return total
