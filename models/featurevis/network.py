"""The network side of feature visualization: a named layer's pre-ReLU value, the objectives on it, and the
optimization's private BN-folded copy of the model."""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.resnet import BasicBlock, ResNet18, canonical_layer
from models.reverse import STAGES

Objective = Literal["channel", "neuron", "negative"]
OBJECTIVES = ("channel", "neuron", "negative")


def _block_pre_relu(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    """A block's output before its last ReLU (mirrors BasicBlock.forward up to relu2, as ReverseBlock.record does)."""
    identity = x if block.downsample is None else block.downsample(x)
    return block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x))))) + identity


def layer_pre_relu(model: ResNet18, x: torch.Tensor, layer: str) -> torch.Tensor:
    """A named layer's activation before its last ReLU (N, C, h, w); the forward stops there and uses no hooks."""
    canon = canonical_layer(layer)
    z = model.bn1(model.conv1(x))
    if canon == "conv1":
        return z
    x = model.maxpool(model.relu(z))
    for stage in STAGES:
        blocks = getattr(model, stage)
        if stage == canon:
            for block in list(blocks)[:-1]:
                x = block(x)
            return _block_pre_relu(blocks[-1], x)
        x = blocks(x)
    raise AssertionError(f"unreachable: {canon}")


def layer_width(model: ResNet18, layer: str) -> int:
    """How many channels a named layer has."""
    canon = canonical_layer(layer)
    bn = model.bn1 if canon == "conv1" else getattr(model, canon)[-1].bn2
    return int(bn.num_features)


def objective_values(z: torch.Tensor, channels: torch.Tensor, objective: str) -> torch.Tensor:
    """Each image's objective (N,) on its own channel of the pre-ReLU map z (N, C, h, w)."""
    maps = z[torch.arange(z.shape[0], device=z.device), channels]
    if objective == "neuron":
        return maps[:, maps.shape[1] // 2, maps.shape[2] // 2]
    mean = maps.flatten(1).mean(1)
    return -mean if objective == "negative" else mean


def activation_values(z: torch.Tensor, channels: torch.Tensor, objective: str) -> torch.Tensor:
    """Each image's post-ReLU activation (N,) of its channel: the map's mean, or its centre for `neuron`."""
    maps = F.relu(z[torch.arange(z.shape[0], device=z.device), channels])
    if objective == "neuron":
        return maps[:, maps.shape[1] // 2, maps.shape[2] // 2]
    return maps.flatten(1).mean(1)


def diversity_penalty(z: torch.Tensor, k: int) -> torch.Tensor:
    """Lucid's diversity term per group of k consecutive images: their post-ReLU Grams' summed pairwise cosine / k."""
    post = F.relu(z).flatten(2)  # (N, C, hw)
    grams = F.normalize((post @ post.transpose(1, 2)).flatten(1), dim=1, eps=1e-10).view(-1, k, post.shape[1] ** 2)
    sim = grams @ grams.transpose(1, 2)  # (G, k, k)
    return (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / k


def optimization_copy(model: ResNet18, bf16: bool, layer: str = "layer4") -> ResNet18:
    """A private copy for the optimization, up to a named layer (the stages above it and the head are left out):
    every eval BN folded into its conv, no parameter gradients, and bf16 weights when asked (cast once here:
    autocast would cast every weight again at every step)."""
    canon = canonical_layer(layer)
    above = STAGES[STAGES.index(canon) + 1 :] if canon in STAGES else STAGES
    # deepcopy returns what the memo holds for an object it meets: the parts left out are never copied.
    memo: dict[int, object] = {id(m): nn.Identity() for m in [*(getattr(model, s) for s in above), model.fc]}
    net = copy.deepcopy(model, memo)
    net.conv1, net.bn1 = fuse_conv_bn_eval(net.conv1, net.bn1), nn.Identity()  # type: ignore[assignment]
    for stage in STAGES:
        if stage in above:
            continue
        for block in getattr(net, stage):
            block.conv1, block.bn1 = fuse_conv_bn_eval(block.conv1, block.bn1), nn.Identity()
            block.conv2, block.bn2 = fuse_conv_bn_eval(block.conv2, block.bn2), nn.Identity()
            if block.downsample is not None:
                block.downsample = nn.Sequential(fuse_conv_bn_eval(block.downsample[0], block.downsample[1]))
    net.requires_grad_(False)
    if bf16:
        net = net.to(torch.bfloat16)
    p = next(net.parameters())
    return net.to(memory_format=memory_format(p))


def memory_format(p: torch.Tensor) -> torch.memory_format:
    """channels_last where the kernels want it: oneDNN's bf16 and cuDNN."""
    return torch.channels_last if p.dtype == torch.bfloat16 or p.device.type == "cuda" else torch.contiguous_format
