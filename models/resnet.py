"""ResNet18 in torchvision's naming and state-dict layout, with the seed's stem and a CIFAR stem."""

from __future__ import annotations

import torch
from torch import nn

from models.errors import UnknownArchitecture, UnknownLayer

ARCHS = ("resnet18", "resnet18-cifar")
STEMS = {"resnet18": "imagenet", "resnet18-cifar": "cifar"}  # each architecture's stem (ResNet18's `stem`)

# Named layers every visual endpoint accepts; `conv1` is the stem's conv+BN+ReLU output.
LAYER_NAMES = ("conv1", "layer1", "layer2", "layer3", "layer4")
# The seed report's names (after the ResNet paper's table) for the four stages.
LAYER_ALIASES = {"conv2_x": "layer1", "conv3_x": "layer2", "conv4_x": "layer3", "conv5_x": "layer4"}
LAYER_CHOICES = LAYER_NAMES + tuple(LAYER_ALIASES)  # what a `layer=` parameter may name (the API's enum)
# Every conv by its dotted module name, the same for both stems (tests/models check it against the modules):
# what the API's conv-layer enum lists beside the named layers.
CONV_NAMES = ("conv1",) + tuple(
    f"layer{s}.{b}.{c}"
    for s in range(1, 5)
    for b in range(2)
    for c in ("conv1", "conv2", *(("downsample.0",) if s > 1 and b == 0 else ()))
)
CONV_CHOICES = CONV_NAMES + LAYER_CHOICES[1:]
WIDEST = 512  # channels of the widest layer (layer4): the bound of every channel index the API takes


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (a BN follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (the projection shortcut)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock, but with its own non-inplace ReLU per use so hooks see each one."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet18(nn.Module):
    """ResNet18; `stem="imagenet"` is the seed's 7x7/2 conv + 3x3/2 max-pool, `"cifar"` a 3x3/1 conv."""

    def __init__(self, num_classes: int = 10, stem: str = "imagenet") -> None:
        super().__init__()
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"unknown stem {stem!r}")
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._make_layer(64, 64, stride=1)
        self.layer2 = self._make_layer(64, 128, stride=2)
        self.layer3 = self._make_layer(128, 256, stride=2)
        self.layer4 = self._make_layer(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        self._init_weights()

    @staticmethod
    def _make_layer(inplanes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes, 1))

    def _init_weights(self) -> None:
        # torchvision's initialisation, so a fresh model behaves like theirs.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(arch: str, num_classes: int = 10) -> ResNet18:
    """Build an architecture by name (`resnet18` or `resnet18-cifar`)."""
    if arch in STEMS:
        return ResNet18(num_classes, stem=STEMS[arch])
    raise UnknownArchitecture(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")


def canonical_layer(name: str) -> str:
    """Map a layer name or seed alias (`conv5_x`) to its canonical name (`layer4`)."""
    canon = LAYER_ALIASES.get(name, name)
    if canon not in LAYER_NAMES:
        valid = list(LAYER_NAMES) + list(LAYER_ALIASES)
        raise UnknownLayer(f"unknown layer {name!r}; valid layers: {', '.join(valid)}")
    return canon


def layer_module(model: ResNet18, name: str) -> nn.Module:
    """The module whose output is the named layer's activation (`conv1` -> the stem's ReLU)."""
    canon = canonical_layer(name)
    return model.relu if canon == "conv1" else getattr(model, canon)


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Every conv layer by its dotted module name (`conv1`, `layer4.1.conv2`, ...)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def conv_layer(model: nn.Module, name: str) -> nn.Conv2d:
    """A conv layer by dotted name, or by a named layer (its first conv: `layer2` -> `layer2.0.conv1`)."""
    convs = conv_layers(model)
    if name in convs:
        return convs[name]
    if name in LAYER_ALIASES or name in LAYER_NAMES:
        canon = canonical_layer(name)
        return convs["conv1" if canon == "conv1" else f"{canon}.0.conv1"]
    raise UnknownLayer(f"unknown conv layer {name!r}; valid: {', '.join(convs)} (or {', '.join(LAYER_NAMES)})")


def _half(side: int) -> int:
    return (side + 1) // 2  # a stride-2 conv or pool with "same" padding rounds up


def layer_sizes(stem: str, input_size: int) -> dict[str, int]:
    """Each named layer's map side for a square input (the seed stem halves it twice, layer2..layer4 once each)."""
    side = input_size if stem == "cifar" else _half(input_size)
    sizes = {"conv1": side}
    side = side if stem == "cifar" else _half(side)  # the seed stem's max-pool
    for i, name in enumerate(LAYER_NAMES[1:]):
        side = side if i == 0 else _half(side)
        sizes[name] = side
    return sizes


MIN_CAM_SIDE = 4  # a coarser map paints a class-activation heatmap as a few blocks (2x2 is one quadrant each)


def cam_layer(stem: str, input_size: int) -> str:
    """The default layer for Grad-CAM, occlusion and the page: the deepest named layer whose map is >= 4x4."""
    sizes = layer_sizes(stem, input_size)
    return next(n for n in reversed(LAYER_NAMES) if sizes[n] >= MIN_CAM_SIDE or n == "conv1")
