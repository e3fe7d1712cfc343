"""The reverse network against the autograd formulation, in float64, with negative controls."""

from __future__ import annotations

import copy
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import InvalidArgument, UnknownLayer
from models.hooks import LayerRecorder
from models.resnet import LAYER_NAMES, BasicBlock, ResNet18
from models.reverse import (
    FOLD_MIN_BATCH,
    ForwardRecord,
    ReverseResNet,
    Rule,
    bn_scale,
    conv_transpose,
    live_taps,
    make_seeds,
    project_classes,
    project_positions,
    reconstruct,
    unpool_scatter_add,
)
from tests.helpers import random_model

SIZES = {"resnet18": 48, "resnet18-cifar": 16}  # both give layer4 a 2x2 map; small keeps float64 fast


@pytest.fixture(scope="module", params=list(SIZES))
def arch_model(request: pytest.FixtureRequest) -> tuple[str, ResNet18, torch.Tensor]:
    arch = request.param
    torch.manual_seed(1)
    return arch, random_model(arch, torch.float64), torch.randn(3, SIZES[arch], SIZES[arch], dtype=torch.float64)


class _ModifiedReLU(torch.autograd.Function):
    """ReLU whose backward is relu(signal) (deconvnet), also masked by the forward sign when guided."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, guided: bool) -> torch.Tensor:
        y = x.clamp_min(0)
        ctx.save_for_backward(y)
        ctx.guided = guided
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (y,) = ctx.saved_tensors
        g = g.clamp_min(0)
        return (g * (y > 0) if ctx.guided else g), None


class _ReLU(nn.Module):
    def __init__(self, guided: bool) -> None:
        super().__init__()
        self.guided = guided

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ModifiedReLU.apply(x, self.guided)


def _block_forward(block: BasicBlock, shortcut: str) -> Any:
    """BasicBlock.forward with one path detached, so autograd expresses shortcut=residual|identity."""

    def forward(self: BasicBlock, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if shortcut == "residual":
            identity = identity.detach()
        elif shortcut == "identity":
            out = out.detach()
        return self.relu2(out + identity)

    return types.MethodType(forward, block)


def reference_model(model: ResNet18, rule: str, shortcut: str = "sum") -> ResNet18:
    """A copy whose ReLU backward follows the rule (and whose blocks route the signal per shortcut)."""
    ref = copy.deepcopy(model)
    for mod in list(ref.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(mod, name, _ReLU(rule == "guided"))
        if isinstance(mod, BasicBlock) and shortcut != "sum":
            mod.forward = _block_forward(mod, shortcut)  # type: ignore[method-assign]
    return ref


def autograd_projection(ref: ResNet18, image: torch.Tensor, layer: str, seeds: torch.Tensor) -> torch.Tensor:
    """d<layer output, seed>/d input for each seed: the autograd formulation of the reverse pass."""
    x = image.unsqueeze(0).repeat(seeds.shape[0], 1, 1, 1).requires_grad_()
    with LayerRecorder(ref, [layer], detach=False) as rec:
        ref(x)
    (g,) = torch.autograd.grad(rec.activations[layer], x, seeds)
    return g


def layer_act(model: ResNet18, image: torch.Tensor, layer: str) -> torch.Tensor:
    """One image's activation (C, h, w) at a named layer."""
    with torch.no_grad():
        return ReverseResNet(model).record(image.unsqueeze(0), layer).activations[layer][0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max())
    assert scale > 0, "the reference is zero: the check would be vacuous"
    return float((a - b).abs().max()) / scale


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_matches_autograd_every_layer_mode_and_seed(arch_model: Any, layer: str, rule: Rule) -> None:
    arch, model, image = arch_model
    ref = reference_model(model, rule)
    for seed in ("activation", "argmax"):
        each = reconstruct(model, image, layer, channels=3, mode="each", seed=seed, rule=rule)
        act = layer_act(model, image, layer)
        expected = autograd_projection(ref, image, layer, make_seeds(act, each.channels, "each", seed))
        assert rel_err(each.projections, expected) < 1e-10, (arch, layer, rule, seed)
        whole = reconstruct(model, image, layer, mode="whole", seed=seed, rule=rule)
        expected = autograd_projection(ref, image, layer, make_seeds(act, whole.channels, "whole", seed))
        assert whole.projections.shape == (1, 3, *image.shape[1:])
        assert rel_err(whole.projections, expected) < 1e-10, (arch, layer, rule, seed)


@pytest.mark.parametrize("shortcut", ["residual", "identity"])
@pytest.mark.parametrize("layer", ["layer2", "layer4"])
def test_shortcut_modes_match_autograd(arch_model: Any, layer: str, shortcut: str) -> None:
    _, model, image = arch_model
    for rule in ("deconvnet", "guided"):
        got = reconstruct(model, image, layer, channels=2, rule=rule, shortcut=shortcut)  # type: ignore[arg-type]
        act = layer_act(model, image, layer)
        ref = reference_model(model, rule, shortcut)
        expected = autograd_projection(ref, image, layer, make_seeds(act, got.channels, "each", "activation"))
        assert rel_err(got.projections, expected) < 1e-10


def test_class_projection_matches_autograd(arch_model: Any) -> None:
    _, model, image = arch_model
    for rule in ("deconvnet", "guided"):
        got = project_classes(model, image, classes=[1, 7], rule=rule)  # type: ignore[arg-type]
        x = image.unsqueeze(0).repeat(2, 1, 1, 1).requires_grad_()
        logits = reference_model(model, rule)(x)
        (expected,) = torch.autograd.grad(logits[[0, 1], [1, 7]].sum(), x)
        assert rel_err(got.projections, expected) < 1e-10
        assert got.activation_max == pytest.approx(logits[0, [1, 7]].tolist())
    assert project_classes(model, image).channels == [int(model(image.unsqueeze(0)).argmax())]


def test_forward_record_matches_model(arch_model: Any) -> None:
    _, model, image = arch_model
    rec = ReverseResNet(model).record(image.unsqueeze(0))
    assert rec.logits is not None
    torch.testing.assert_close(rec.logits, model(image.unsqueeze(0)), rtol=0, atol=1e-12)
    assert len(rec.masks) == 17


class _MaxUnpoolReverse(ReverseResNet):
    """The seed report's max_unpool2d: overwrites where the 3x3/2 windows overlap instead of adding."""

    def unpool(self, g: torch.Tensor, rec: ForwardRecord) -> torch.Tensor:
        assert rec.pool_indices is not None and rec.pool_input_size is not None
        idx = rec.pool_indices.expand(g.shape[0], -1, -1, -1)
        return F.max_unpool2d(g, idx, (3, 3), (2, 2), (1, 1), output_size=rec.pool_input_size)


def test_negative_control_max_unpool_differs() -> None:
    model = random_model("resnet18", torch.float64)
    image = torch.randn(3, 64, 64, dtype=torch.float64)
    ref = reference_model(model, "deconvnet")
    rev, bad = ReverseResNet(model), _MaxUnpoolReverse(model)
    rec = rev.record(image.unsqueeze(0), "layer1")
    seeds = make_seeds(rec.activations["layer1"][0], list(range(64)), "whole", "activation")
    expected = autograd_projection(ref, image, "layer1", seeds)
    assert rel_err(rev(seeds, rec, "layer1"), expected) < 1e-10
    assert rel_err(bad(seeds, rec, "layer1"), expected) > 1e-3


def test_negative_control_train_mode_differs() -> None:
    model = random_model("resnet18", torch.float64)
    image = torch.randn(3, 64, 64, dtype=torch.float64)
    got = reconstruct(model, image, "layer2", mode="whole")
    ref = reference_model(model, "deconvnet").train()
    act = layer_act(model, image, "layer2")
    expected = autograd_projection(ref, image, "layer2", make_seeds(act, got.channels, "whole", "activation"))
    assert rel_err(got.projections, expected) > 1e-3
    with pytest.raises(InvalidArgument, match="eval"):
        reconstruct(copy.deepcopy(model).train(), image, "layer2")


@torch.no_grad()
@pytest.mark.parametrize("arch", list(SIZES))
def test_conv1_one_hot_is_the_filter_times_bn_scale(arch: str) -> None:
    model = random_model(arch, torch.float64)
    image = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    rev = ReverseResNet(model)
    rec = rev.record(image, "conv1")
    conv = model.conv1
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding
    assert isinstance(p, tuple)
    c, scale = 5, bn_scale(model.bn1).flatten()
    for row, col in ((6, 7), (0, 0)):  # interior, and a corner where the filter is clipped
        seed = torch.zeros_like(rec.activations["conv1"])
        seed[0, c, row, col] = 1.0
        got = rev(seed, rec, "conv1")[0]
        expected = torch.zeros(3, 32 + 2 * p[0], 32 + 2 * p[1], dtype=torch.float64)
        top, left = row * s, col * s  # in padded coordinates
        expected[:, top : top + k, left : left + k] = conv.weight[c] * scale[c]
        expected = expected[:, p[0] : p[0] + 32, p[1] : p[1] + 32]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)


@torch.no_grad()
@pytest.mark.parametrize(
    ("arch", "layer"), [("resnet18", "conv1"), ("resnet18", "layer2"), ("resnet18-cifar", "conv1")]
)
def test_batched_all_channels_equals_single_channel_passes(arch: str, layer: str) -> None:
    model = random_model(arch, torch.float64)
    image = torch.randn(3, 32, 32, dtype=torch.float64)
    for rule in ("deconvnet", "guided") if layer == "conv1" else ("guided",):
        batched = reconstruct(model, image, layer, rule=rule)  # type: ignore[arg-type]
        rev = ReverseResNet(model)
        with torch.no_grad():
            rec = rev.record(image.unsqueeze(0), layer)
        act = rec.activations[layer][0]
        singles = torch.cat(
            [rev(make_seeds(act, [c], "each", "activation"), rec, layer, rule) for c in batched.channels]
        )
        assert batched.channels == list(range(act.shape[0]))
        assert rel_err(batched.projections, singles) < 1e-12
    chunked = reconstruct(model, image, layer, chunk=7)
    torch.testing.assert_close(chunked.projections, reconstruct(model, image, layer).projections, rtol=0, atol=1e-13)


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_folded_batches_and_dead_channels_match_autograd(arch_model: Any, rule: Rule) -> None:
    """From FOLD_MIN_BATCH seeds a pass, the BN-folded weights run; a dead channel (all-zero seed) is skipped."""
    _, model, image = arch_model
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.layer4[1].bn2.bias[5] = -1e6  # channel 5 of layer4 is zero everywhere, for any image
    channels = [5, *range(6, 6 + FOLD_MIN_BATCH + 1)]
    for chunk in (None, FOLD_MIN_BATCH):
        got = reconstruct(model, image, "layer4", channels=channels, rule=rule, chunk=chunk)
        act = layer_act(model, image, "layer4")
        assert not act[5].any() and act[channels[1:]].flatten(1).any(1).all()
        expected = autograd_projection(
            reference_model(model, rule), image, "layer4", make_seeds(act, channels, "each", "activation")
        )
        assert not got.projections[0].any()
        assert rel_err(got.projections, expected) < 1e-10


def test_conv_transpose_equals_autograd_when_taps_are_cropped() -> None:
    """Maps smaller than the kernel (a 1x1 map under a 3x3 conv): the taps that only reach padding are dropped."""
    torch.manual_seed(0)
    # (kernel, stride, padding, dilation, input height): inputs of 1 to 3 rows, and one the kernel fits (no crop)
    cases = [(3, 1, 1, 1, 1), (3, 2, 1, 1, 2), (3, 2, 1, 1, 1), (7, 2, 3, 1, 3), (3, 1, 2, 2, 2), (5, 1, 2, 1, 1)]
    for k, stride, padding, dilation, size in [*cases, (3, 1, 1, 1, 4)]:
        conv = nn.Conv2d(4, 6, k, stride, padding, dilation, bias=False).double()
        x = torch.randn(2, 4, size, size + 1, dtype=torch.float64, requires_grad=True)
        y = conv(x)
        g = torch.randn_like(y)
        (expected,) = torch.autograd.grad(y, x, g)
        crop = live_taps(conv, g, (size, size + 1))
        assert (crop is None) == (size == 4), (k, stride, padding, dilation, size)
        weight = conv.weight.detach()
        if crop is not None:
            weight = weight[:, :, crop[0][0] : crop[0][1] + 1, crop[1][0] : crop[1][1] + 1]
        with torch.no_grad():
            got = conv_transpose(g, conv, (size, size + 1), weight, crop=crop)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_one_by_one_layer4_matches_autograd(rule: Rule) -> None:
    """32x32 through the seed stem: layer4 is 1x1, where batches run 3x3 transposes cut to their centre tap."""
    model = random_model("resnet18", torch.float64)
    image = torch.randn(3, 32, 32, dtype=torch.float64)
    got = reconstruct(model, image, "layer4", channels=FOLD_MIN_BATCH + 2, rule=rule)
    act = layer_act(model, image, "layer4")
    assert act.shape[-2:] == (1, 1)
    expected = autograd_projection(
        reference_model(model, rule), image, "layer4", make_seeds(act, got.channels, "each", "activation")
    )
    assert rel_err(got.projections, expected) < 1e-10


def test_unpool_channels_last_equals_contiguous() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 5, 9, 8, dtype=torch.float64)
    _, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    g = torch.randn(3, 5, *indices.shape[-2:], dtype=torch.float64)
    expected = unpool_scatter_add(g, indices, (9, 8))
    got = unpool_scatter_add(g.contiguous(memory_format=torch.channels_last), indices, (9, 8))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)


@torch.no_grad()
def test_zero_seed_gives_zero_image(arch_model: Any) -> None:
    _, model, image = arch_model
    rev = ReverseResNet(model)
    rec = rev.record(image.unsqueeze(0))
    for layer in LAYER_NAMES:
        zeros = torch.zeros_like(rec.activations[layer])
        assert not rev(zeros, rec, layer).any()
        assert not rev.forward_channels(zeros[:, 0], [0], rec, layer).any()
    assert not rev(torch.zeros(1, 10, dtype=torch.float64), rec, "logits").any()


def test_top_n_and_argmax_positions(arch_model: Any) -> None:
    _, model, image = arch_model
    r = reconstruct(model, image, "conv5_x", channels=5, seed="argmax")
    assert r.layer == "layer4" and len(r.channels) == 5 and r.projections.shape[0] == 5
    assert r.activation_max == sorted(r.activation_max, reverse=True)
    act = layer_act(model, image, "layer4")
    assert min(r.activation_max) >= float(act.flatten(1).amax(1).sort(descending=True).values[4])
    hits = project_positions(model, image.unsqueeze(0).repeat(5, 1, 1, 1), "layer4", r.channels[0], [r.argmax[0]] * 5)
    assert rel_err(hits, r.projections[:1].expand(5, -1, -1, -1)) < 1e-12


def test_bad_arguments_are_clear(arch_model: Any) -> None:
    _, model, image = arch_model
    with pytest.raises(InvalidArgument, match=r"0\.\.63"):
        reconstruct(model, image, "conv1", channels=[64])
    # top:N past the layer's width gives every channel (as SQL's LIMIT), strongest first.
    assert sorted(reconstruct(model, image, "conv1", channels=100).channels) == list(range(64))
    for bad in ([], 0, "some", True, [-1]):
        with pytest.raises(InvalidArgument):
            reconstruct(model, image, "conv1", channels=bad)  # type: ignore[arg-type]
    with pytest.raises(UnknownLayer, match="conv2_x"):
        reconstruct(model, image, "layer9")
    with pytest.raises(InvalidArgument, match="mode"):
        reconstruct(model, image, "conv1", mode="both")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="shape"):
        reconstruct(model, image[:2], "conv1")
    rev = ReverseResNet(model)
    with torch.no_grad():
        rec = rev.record(image.unsqueeze(0), "conv1")
        with pytest.raises(InvalidArgument, match="upto"):
            rev(torch.zeros(1, 128, 2, 2, dtype=torch.float64), rec, "conv3_x")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small float64 ops
