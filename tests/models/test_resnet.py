"""The two ResNet18 stems: shapes, names, torchvision equivalence, layer lookup."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from models.errors import UnknownArchitecture, UnknownLayer
from models.resnet import (
    ARCHS,
    CONV_NAMES,
    LAYER_ALIASES,
    LAYER_NAMES,
    MIN_CAM_SIDE,
    build_model,
    cam_layer,
    canonical_layer,
    conv_layer,
    conv_layers,
    layer_module,
    layer_sizes,
)

SHAPES = {
    "resnet18": {
        "conv1": (64, 16, 16),
        "layer1": (64, 8, 8),
        "layer2": (128, 4, 4),
        "layer3": (256, 2, 2),
        "layer4": (512, 1, 1),
    },
    "resnet18-cifar": {
        "conv1": (64, 32, 32),
        "layer1": (64, 32, 32),
        "layer2": (128, 16, 16),
        "layer3": (256, 8, 8),
        "layer4": (512, 4, 4),
    },
}


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_named_layer_shapes(arch: str) -> None:
    model = build_model(arch, 10).eval()
    seen: dict[str, tuple[int, ...]] = {}
    handles = [
        layer_module(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, tuple(out.shape[1:]))
        )
        for name in SHAPES[arch]
    ]
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    assert seen == SHAPES[arch]
    assert logits.shape == (2, 10)


def test_aliases_map_to_stages() -> None:
    model = build_model("resnet18")
    for alias, canon in LAYER_ALIASES.items():
        assert canonical_layer(alias) == canon
        assert layer_module(model, alias) is getattr(model, canon)
    assert layer_module(model, "conv1") is model.relu


def test_every_relu_is_its_own_non_inplace_module() -> None:
    model = build_model("resnet18")
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 8 * 2
    assert len({id(m) for m in relus}) == len(relus)
    assert not any(m.inplace for m in relus)


def test_torchvision_state_dict_loads_and_matches() -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a layout mix-up would show
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ours = build_model("resnet18", 10).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))
    assert list(ours.state_dict()) == list(tv.state_dict())


def test_cifar_stem_differs_only_in_conv1() -> None:
    a, b = build_model("resnet18").state_dict(), build_model("resnet18-cifar").state_dict()
    assert list(a) == list(b)
    assert [k for k in a if a[k].shape != b[k].shape] == ["conv1.weight"]
    assert b["conv1.weight"].shape == (64, 3, 3, 3)


def test_unknown_names_are_clear() -> None:
    with pytest.raises(UnknownArchitecture, match="resnet18-cifar"):
        build_model("resnet50")
    with pytest.raises(UnknownLayer, match="conv5_x"):
        canonical_layer("layer9")
    model = build_model("resnet18")
    assert conv_layer(model, "layer4.1.conv2") is model.layer4[1].conv2
    assert conv_layer(model, "conv3_x") is model.layer2[0].conv1
    with pytest.raises(UnknownLayer, match="layer4.1.conv2"):
        conv_layer(model, "fc")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [31, 32, 48, 64])
def test_layer_sizes_are_the_maps_a_forward_pass_makes(arch: str, size: int) -> None:
    model = build_model(arch).eval()
    seen: dict[str, int] = {}
    hooks = [
        layer_module(model, n).register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, o.shape[-1]))
        for n in LAYER_NAMES
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    assert layer_sizes(model.stem, size) == seen
    layer = cam_layer(model.stem, size)
    assert seen[layer] >= MIN_CAM_SIDE and all(
        seen[n] < MIN_CAM_SIDE for n in LAYER_NAMES[LAYER_NAMES.index(layer) + 1 :]
    )


def test_conv_names_are_both_stems_modules() -> None:
    for arch in ARCHS:
        assert tuple(conv_layers(build_model(arch))) == CONV_NAMES
    assert cam_layer("imagenet", 48) == "layer2" and cam_layer("cifar", 32) == "layer4"
