"""The hook recorder: what it records, and that it never leaves hooks (or tensors) behind."""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from models.errors import UnknownLayer
from models.hooks import LayerRecorder, count_hooks, record_activations
from models.resnet import ARCHS, LAYER_NAMES, ResNet18, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> ResNet18:
    torch.manual_seed(0)
    return build_model("resnet18").eval()


def test_records_every_named_layer_and_aliases(model: ResNet18) -> None:
    x = torch.randn(2, 3, 32, 32)
    acts = record_activations(model, x, ["conv1", "conv2_x", "layer2", "conv4_x", "conv5_x"])
    assert list(acts) == list(LAYER_NAMES)
    assert [tuple(a.shape) for a in acts.values()] == [
        (2, 64, 16, 16),
        (2, 64, 8, 8),
        (2, 128, 4, 4),
        (2, 256, 2, 2),
        (2, 512, 1, 1),
    ]
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(x)))
        torch.testing.assert_close(acts["conv1"], stem)
        torch.testing.assert_close(acts["layer1"], model.layer1(model.maxpool(stem)))


def test_records_gradients(model: ResNet18) -> None:
    x = torch.randn(1, 3, 32, 32)
    with LayerRecorder(model, ["layer3"], gradients=True, detach=False) as rec:
        out = model(x)
        (expected,) = torch.autograd.grad(out[0, 3], rec.activations["layer3"], retain_graph=True)
        out[0, 3].backward()
    torch.testing.assert_close(rec.gradients["layer3"], expected)
    model.zero_grad(set_to_none=True)


def test_hooks_released_over_100_calls(model: ResNet18) -> None:
    x = torch.randn(1, 3, 32, 32)
    before = count_hooks(model)
    record_activations(model, x, LAYER_NAMES)  # warm-up: lazily created objects are not a leak
    gc.collect()
    tensors_before = _live_tensors()
    for _ in range(100):
        record_activations(model, x, LAYER_NAMES)
        with LayerRecorder(model, ["layer4"], gradients=True, detach=False):
            model(x.requires_grad_()).sum().backward()
        x.grad = None
    model.zero_grad(set_to_none=True)
    gc.collect()
    assert count_hooks(model) == before
    assert _live_tensors() <= tensors_before + 5


def _live_tensors() -> int:
    with warnings.catch_warnings():  # isinstance() on some lazily deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def test_hooks_released_when_the_body_raises(model: ResNet18) -> None:
    before = count_hooks(model)
    with pytest.raises(RuntimeError), LayerRecorder(model, LAYER_NAMES):
        assert count_hooks(model) == before + len(LAYER_NAMES)
        raise RuntimeError("boom")
    assert count_hooks(model) == before


def test_recorded_tensors_are_not_kept_alive(model: ResNet18) -> None:
    rec = LayerRecorder(model, ["layer1"])
    with torch.no_grad(), rec:
        model(torch.randn(1, 3, 32, 32))
    ref = weakref.ref(rec.activations["layer1"])
    with torch.no_grad(), rec:  # entering again starts empty and drops the previous tensors
        pass
    gc.collect()
    assert ref() is None and rec.activations == {}


def test_unknown_layer(model: ResNet18) -> None:
    with pytest.raises(UnknownLayer, match="conv5_x"):
        LayerRecorder(model, ["fc"])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_relu_is_a_module_and_the_forward_calls_17(arch: str) -> None:
    m = build_model(arch).eval()
    relus = [mod for mod in m.modules() if isinstance(mod, nn.ReLU)]
    assert len(relus) == 17 and not any(r.inplace for r in relus)
    calls: list[nn.Module] = []
    handles = [r.register_forward_hook(lambda mod, i, o: calls.append(mod)) for r in relus]
    try:
        with torch.no_grad(), _CountReLU() as fn:
            m(torch.randn(1, 3, 16, 16))
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 17 and len(set(map(id, calls))) == 17
    assert fn.count == 17  # no functional ReLU hides outside a module


class _CountReLU(TorchFunctionMode):
    """Counts ReLU calls made at the torch-function level (F.relu, torch.relu, Tensor.relu)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in ("relu", "relu_"):
            self.count += 1
        return func(*args, **(kwargs or {}))
