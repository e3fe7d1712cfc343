"""The reverse ResNet18 (Zeiler-Fergus deconvnet, guided backprop), sharing the forward network's weights.

Running the net backwards is its backward pass with every ReLU's backward replaced by ReLU of the incoming
signal (`rule="deconvnet"`), also masked by the forward ReLU's sign for `rule="guided"`: the forward network
mirrored, each module replaced by its transpose and run in the opposite order.

    forward, run top to bottom         reverse, run bottom to top
    conv1 -> bn1 -> relu               conv1^T <- bn1^T <- relu^T    (conv_transpose2d, BN's scale, ReLU of the signal)
    maxpool                            unpool                        (scatter-add to the recorded switches)
    layer1 .. layer4: BasicBlocks      ReverseBlocks, last one first: g = relu2^T(g_out), then the residual path's
                                       (conv1 bn1 relu1 conv2 bn2)^T g + the shortcut's S^T g, or one (`shortcut`)
    avgpool -> fc                      avgpool^T <- fc^T             (avgpool^T: spread evenly over the map)

docs/DESIGN.md, "The reverse network (deconvnet), precisely", derives it. models/reverse_speed.py holds what
makes it fast on a CPU (BN folding, cut kernels, memory layouts, chunks, skipping dead seeds); none of it
changes a result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import InvalidArgument, NoSuchChannel
from models.resnet import BasicBlock, ResNet18, canonical_layer
from models.reverse_speed import FOLD_MIN_BATCH as FOLD_MIN_BATCH  # re-exported: its home was here
from models.reverse_speed import (
    Crop,
    auto_chunk,
    fast_layout,
    fold_and_cut,
    live_seeds,
    prepared_weight,
    transpose_padding,
)
from models.reverse_speed import live_taps as live_taps  # re-exported: its home was here

Rule = Literal["deconvnet", "guided"]
Shortcut = Literal["sum", "residual", "identity"]
Mode = Literal["each", "whole"]
Seed = Literal["activation", "argmax"]
Channels = Literal["all"] | list[int] | int

RULES = ("deconvnet", "guided")
SHORTCUTS = ("sum", "residual", "identity")
MODES = ("each", "whole")
SEEDS = ("activation", "argmax")
STAGES = ("layer1", "layer2", "layer3", "layer4")


@dataclass
class ForwardRecord:
    """What one forward pass leaves for the reverse pass: activations, ReLU signs, pool switches, sizes."""

    activations: dict[str, torch.Tensor] = field(default_factory=dict)  # named layer -> (N, C, h, w)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # ReLU module name -> output > 0 (bool)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # conv module name -> its input's (H, W)
    pool_indices: torch.Tensor | None = None  # max-pool argmax switches, flat per channel
    pool_input_size: tuple[int, int] | None = None
    logits: torch.Tensor | None = None


@dataclass
class Reconstruction:
    """Projections of one image's layer activation to input space, with the activations they came from."""

    projections: torch.Tensor  # (K, 3, H, W), in the model's (normalised) input space; K = 1 for mode=whole
    channels: list[int]  # mode=each: the channel (or class) of each projection; whole: the channels seeded
    layer: str  # canonical layer name, or "logits" for class projections
    activation_shape: tuple[int, ...]  # (C, h, w) of the layer for this image ((classes,) for logits)
    activation_max: list[float]  # per entry of `channels`: its strongest activation (the logit for classes)
    activation_mean: list[float]  # per entry of `channels`: its mean activation
    argmax: list[tuple[int, int]]  # per entry of `channels`: (row, col) of the strongest activation
    mode: str = "each"
    seed: str = "activation"
    rule: str = "deconvnet"
    shortcut: str = "sum"


# The transposes of the forward modules. -------------------------------------------------------------------------


def _relu_t(g: torch.Tensor, mask: torch.Tensor, rule: Rule, inplace: bool = False) -> torch.Tensor:
    """A ReLU run backwards: rectify the signal; guided also keeps only where the forward ReLU passed.

    `inplace` overwrites g (for signals the reverse pass owns: it saves a full-size allocation and pass).
    """
    if inplace:
        g = g.relu_()
        return g.mul_(mask) if rule == "guided" else g
    g = F.relu(g)
    return g * mask if rule == "guided" else g


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """An eval-mode BN's derivative per channel, `weight / sqrt(running_var + eps)`, shaped (1, C, 1, 1)."""
    if bn.running_var is None:
        raise InvalidArgument("batch norm without running statistics cannot be reversed")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    return scale.view(1, -1, 1, 1)


def conv_transpose(
    g: torch.Tensor,
    conv: nn.Conv2d,
    in_size: tuple[int, int],
    weight: torch.Tensor | None = None,
    groups: int = 1,
    crop: Crop | None = None,
) -> torch.Tensor:
    """Transpose of a bias-free conv, with the output_padding that restores the forward input's size.

    `weight` replaces the conv's own (a BN-folded or channel-selected one); `crop`: it is cut to these taps.
    """
    padding, out_padding = transpose_padding(g, conv, in_size, crop)
    w = conv.weight if weight is None else weight
    g = fast_layout(g, w, groups)
    return F.conv_transpose2d(g, w, None, conv.stride, padding, out_padding, groups * conv.groups, conv.dilation)


def bn_conv_transpose(
    g: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    in_size: tuple[int, int],
    folded: dict[str, torch.Tensor],
    key: str,
) -> torch.Tensor:
    """(conv then eval BN)^T of a dense signal (K, C_out, h, w): BN's scale, then the transposed conv.

    reverse_speed may run the same with the scale folded into the weight and the kernel cut to its live taps;
    that weight is made once and kept in `folded` under `key`.
    """
    fold, crop = fold_and_cut(g, conv, in_size)
    if not fold and crop is None:
        return conv_transpose(g * bn_scale(bn), conv, in_size)
    w = prepared_weight(folded, key, conv, lambda: bn_scale(bn), fold, crop)
    return conv_transpose(g if fold else g * bn_scale(bn), conv, in_size, w, crop=crop)


def conv_transpose_channels(
    g: torch.Tensor, conv: nn.Conv2d, channels: list[int], in_size: tuple[int, int]
) -> torch.Tensor:
    """Transpose of a conv for K signals each living in one output channel: g (1, K, h, w) -> (K, C_in, H, W).

    One grouped transposed conv (group k uses filter channels[k]) costs 1/C of the dense pass on (K, C, h, w).
    """
    out = conv_transpose(g, conv, in_size, weight=conv.weight[channels], groups=len(channels))
    return out.view(len(channels), -1, *in_size)


def pick_channels(t: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """(N, C, h, w) -> (1, K, h, w): channel channels[k] of image 0 (N = 1) or of image k (N = K)."""
    idx = torch.tensor(channels, device=t.device)
    if t.shape[0] == 1:
        return t[:, idx]
    return t[torch.arange(len(channels), device=t.device), idx].unsqueeze(0)


def unpool_scatter_add(g: torch.Tensor, indices: torch.Tensor, in_size: tuple[int, int]) -> torch.Tensor:
    """Route each pooled signal to its recorded argmax and add where windows overlap (max-pool's transpose).

    A channels-last signal is scattered along the spatial axis of its (K, h*w, C) view, and the result stays
    channels-last (no conversion either way).
    """
    k, c = g.shape[:2]
    if g.dim() == 4 and g.is_contiguous(memory_format=torch.channels_last):
        out = g.new_zeros(k, in_size[0] * in_size[1], c)
        index = indices.flatten(2).transpose(1, 2).expand(k, -1, -1)
        out.scatter_add_(1, index, g.permute(0, 2, 3, 1).reshape(k, -1, c))
        return out.view(k, *in_size, c).permute(0, 3, 1, 2)
    out = g.new_zeros(k, c, in_size[0] * in_size[1])
    out.scatter_add_(2, indices.flatten(2).expand(k, -1, -1), g.flatten(2))
    return out.view(k, c, *in_size)


# The network: a block, then the whole ResNet18. ----------------------------------------------------------------


class ReverseBlock(nn.Module):
    """The reverse of one BasicBlock, holding the forward block (and so its weights).

    `folded` holds the weights reverse_speed prepares (BN-folded, cut), shared across the reverse network and made
    on first use: make a new reverse network after changing the forward network's weights.
    """

    def __init__(self, block: BasicBlock, name: str, folded: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.block = block
        self.name = name
        self.folded = {} if folded is None else folded

    def record(self, x: torch.Tensor, rec: ForwardRecord) -> torch.Tensor:
        """The block's forward, noting conv input sizes and ReLU signs (mirrors BasicBlock.forward)."""
        b, n = self.block, self.name
        size = (x.shape[-2], x.shape[-1])
        rec.sizes[f"{n}.conv1"] = size
        identity = x
        if b.downsample is not None:
            rec.sizes[f"{n}.downsample.0"] = size
            identity = b.downsample(x)
        out = b.relu1(b.bn1(b.conv1(x)))
        rec.masks[f"{n}.relu1"] = out > 0
        rec.sizes[f"{n}.conv2"] = (out.shape[-2], out.shape[-1])
        out = b.relu2(b.bn2(b.conv2(out)) + identity)
        rec.masks[f"{n}.relu2"] = out > 0
        return out

    def forward(
        self, g: torch.Tensor, rec: ForwardRecord, rule: Rule, shortcut: Shortcut, inplace: bool = False
    ) -> torch.Tensor:
        """Signal at the block output -> signal at its input: g = relu(g_out); F^T(g) + S^T(g) per `shortcut`.

        `inplace`: the caller hands g_out over, and it may be overwritten.
        """
        g = _relu_t(g, rec.masks[f"{self.name}.relu2"], rule, inplace)
        out: torch.Tensor | None = None
        if shortcut in ("sum", "residual"):
            out = self._residual_t(self._conv_t(g, "conv2", rec), rec, rule)
        if shortcut in ("sum", "identity"):
            s = g if self.block.downsample is None else self._conv_t(g, "downsample", rec)
            out = s if out is None else out.add_(s)
        assert out is not None
        return out

    def forward_channels(
        self, v: torch.Tensor, channels: list[int], rec: ForwardRecord, rule: Rule, shortcut: Shortcut
    ) -> torch.Tensor:
        """Like forward, for K seeds each in one output channel, given as v (1, K, h, w) -> (K, C_in, H, W)."""
        b, n = self.block, self.name
        g = _relu_t(v, pick_channels(rec.masks[f"{n}.relu2"], channels), rule)
        out: torch.Tensor | None = None
        if shortcut in ("sum", "residual"):
            out = self._residual_t(self._conv_t_channels(g, "conv2", channels, rec), rec, rule)
        if shortcut in ("sum", "identity"):
            if b.downsample is not None:
                s = self._conv_t_channels(g, "downsample", channels, rec)
                out = s if out is None else out.add_(s)
            else:
                # The identity shortcut: seed k's signal adds into channel channels[k] of its projection.
                if out is None:
                    out = g.new_zeros(len(channels), b.bn2.num_features, *g.shape[-2:])
                index = (torch.arange(len(channels), device=g.device), torch.tensor(channels, device=g.device))
                out.index_put_(index, g[0], accumulate=True)
        assert out is not None
        return out

    def _residual_t(self, r: torch.Tensor, rec: ForwardRecord, rule: Rule) -> torch.Tensor:
        """From the signal after conv2's transpose (overwritten) to the block input: relu1^T, then (conv1, bn1)^T."""
        return self._conv_t(_relu_t(r, rec.masks[f"{self.name}.relu1"], rule, inplace=True), "conv1", rec)

    def _conv_bn(self, which: str) -> tuple[nn.Conv2d, nn.BatchNorm2d, str]:
        """`conv1`, `conv2` or `downsample` -> that conv, the BN after it, and the conv's module name."""
        b = self.block
        if which == "downsample":
            assert b.downsample is not None
            conv, bn = b.downsample[0], b.downsample[1]
            assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            return conv, bn, f"{self.name}.downsample.0"
        return getattr(b, which), getattr(b, which.replace("conv", "bn")), f"{self.name}.{which}"

    def _conv_t(self, g: torch.Tensor, which: str, rec: ForwardRecord) -> torch.Tensor:
        """(conv then BN)^T of the named conv on a dense signal (K, C_out, h, w)."""
        conv, bn, key = self._conv_bn(which)
        return bn_conv_transpose(g, conv, bn, rec.sizes[key], self.folded, key)

    def _conv_t_channels(self, g: torch.Tensor, which: str, channels: list[int], rec: ForwardRecord) -> torch.Tensor:
        """(conv then BN)^T of the named conv on K one-channel signals g (1, K, h, w) -> (K, C_in, H, W)."""
        conv, bn, key = self._conv_bn(which)
        return conv_transpose_channels(g * bn_scale(bn)[:, channels], conv, channels, rec.sizes[key])


class ReverseResNet(nn.Module):
    """The explicit reverse ResNet18: records one forward pass, then projects batches of seeds to input space."""

    def __init__(self, model: ResNet18) -> None:
        super().__init__()
        self.model = model
        self.folded: dict[str, torch.Tensor] = {}  # weights reverse_speed prepares, by conv name, made on first use
        self.stages = {
            s: [ReverseBlock(b, f"{s}.{i}", self.folded) for i, b in enumerate(getattr(model, s))] for s in STAGES
        }
        self.blocks = nn.ModuleList([rb for s in STAGES for rb in self.stages[s]])  # registered, in forward order

    def record(self, x: torch.Tensor, upto: str = "logits") -> ForwardRecord:
        """Forward normalised images (N, 3, H, W) up to a named layer (or the logits), recording what reversal needs."""
        m, rec = self.model, ForwardRecord()
        rec.sizes["conv1"] = (x.shape[-2], x.shape[-1])
        x = m.relu(m.bn1(m.conv1(x)))
        rec.masks["relu"] = x > 0
        rec.activations["conv1"] = x
        if upto == "conv1":
            return rec
        if isinstance(m.maxpool, nn.MaxPool2d):
            p = m.maxpool
            rec.pool_input_size = (x.shape[-2], x.shape[-1])
            x, rec.pool_indices = F.max_pool2d(
                x, p.kernel_size, p.stride, p.padding, p.dilation, ceil_mode=p.ceil_mode, return_indices=True
            )
        for stage in STAGES:
            for rb in self.stages[stage]:
                x = rb.record(x, rec)
            rec.activations[stage] = x
            if upto == stage:
                return rec
        rec.logits = m.fc(torch.flatten(m.avgpool(x), 1))
        return rec

    def forward(
        self, seeds: torch.Tensor, rec: ForwardRecord, start: str, rule: Rule = "deconvnet", shortcut: Shortcut = "sum"
    ) -> torch.Tensor:
        """Project seeds placed at `start` (a named layer's output, or "logits") down to input space (K, 3, H, W).

        The record holds one image (then all K seeds reverse that image) or exactly K images (one seed each).
        """
        start = _check_start(rec, start, rule, shortcut)
        g = seeds
        if start == "logits":
            g, start = self._head_t(seeds, rec), "layer4"
        blocks = self._blocks_below(start)
        for i, rb in enumerate(blocks):
            g = rb(g, rec, rule, shortcut, inplace=i > 0)  # the seeds are the caller's; later signals are ours
        return self._stem_t(g, rec, rule, start != "conv1", inplace=bool(blocks))

    def forward_channels(
        self,
        values: torch.Tensor,
        channels: list[int],
        rec: ForwardRecord,
        start: str,
        rule: Rule = "deconvnet",
        shortcut: Shortcut = "sum",
    ) -> torch.Tensor:
        """Equal to forward on seeds with only channel channels[k] nonzero (= values[k], (K, h, w)), but cheaper:
        the first transposed conv runs grouped, one filter per seed, instead of densely over all C channels.
        """
        start = _check_start(rec, start, rule, shortcut)
        if start == "logits":
            raise InvalidArgument("forward_channels starts at a named layer; use forward for class scores")
        m, v = self.model, values.unsqueeze(0)
        if start == "conv1":
            g = _relu_t(v, pick_channels(rec.masks["relu"], channels), rule) * bn_scale(m.bn1)[:, channels]
            return conv_transpose_channels(g, m.conv1, channels, rec.sizes["conv1"])
        blocks = self._blocks_below(start)
        g = blocks[0].forward_channels(v, channels, rec, rule, shortcut)
        for rb in blocks[1:]:
            g = rb(g, rec, rule, shortcut, inplace=True)
        return self._stem_t(g, rec, rule, True, inplace=True)

    def _head_t(self, g: torch.Tensor, rec: ForwardRecord) -> torch.Tensor:
        """Class scores (K, classes) -> signal at layer4's output: fc^T, then avgpool^T."""
        act = rec.activations["layer4"]
        g = (g @ self.model.fc.weight).view(g.shape[0], -1, 1, 1)
        return g.expand(-1, -1, act.shape[-2], act.shape[-1]) / (act.shape[-2] * act.shape[-1])

    def _blocks_below(self, start: str) -> list[ReverseBlock]:
        """The blocks from a named layer down to the stem, in reverse order."""
        if start not in STAGES:
            return []
        return [rb for stage in reversed(STAGES[: STAGES.index(start) + 1]) for rb in reversed(self.stages[stage])]

    def unpool(self, g: torch.Tensor, rec: ForwardRecord) -> torch.Tensor:
        """The max-pool's transpose (a method so a test can swap in max_unpool2d as a negative control)."""
        assert rec.pool_indices is not None and rec.pool_input_size is not None
        return unpool_scatter_add(g, rec.pool_indices, rec.pool_input_size)

    def _stem_t(
        self, g: torch.Tensor, rec: ForwardRecord, rule: Rule, unpool: bool, inplace: bool = False
    ) -> torch.Tensor:
        """Max-pool (when the signal comes from above it), stem ReLU, BN and conv, reversed.

        `inplace`: the caller hands over g (it may be overwritten). The result is NCHW, whatever layout ran.
        """
        if unpool and rec.pool_indices is not None:
            g, inplace = self.unpool(g, rec), True
        g = _relu_t(g, rec.masks["relu"], rule, inplace)
        m = self.model
        return bn_conv_transpose(g, m.conv1, m.bn1, rec.sizes["conv1"], self.folded, "conv1").contiguous()


# Requests: one image, the channels chosen, their seeds, the passes. --------------------------------------------


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidArgument(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _check_start(rec: ForwardRecord, start: str, rule: str, shortcut: str) -> str:
    """Validate the options and that the record reaches `start`; returns its canonical name."""
    _check_choice("rule", rule, RULES)
    _check_choice("shortcut", shortcut, SHORTCUTS)
    start = start if start == "logits" else canonical_layer(start)
    if (rec.logits is None) if start == "logits" else (start not in rec.activations):
        raise InvalidArgument(f"the forward record stops below {start!r}; record with upto={start!r}")
    return start


def as_batch(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) or (1, 3, H, W) -> (1, 3, H, W) on the model's device and dtype."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise InvalidArgument(f"expected one normalised image (3, H, W); got shape {tuple(image.shape)}")
    p = next(model.parameters())
    return image.to(device=p.device, dtype=p.dtype)


def _require_eval(model: nn.Module) -> None:
    if model.training:
        raise InvalidArgument("the reverse network needs the model in eval mode (BN with running statistics)")


def select_channels(channels: Channels, strength: torch.Tensor, what: str = "channel") -> list[int]:
    """`"all"`, a list of indices, or an int N (the N strongest by `strength`, strongest first) -> indices."""
    n = int(strength.shape[0])
    if isinstance(channels, str):
        if channels != "all":
            raise InvalidArgument(f"{what}s must be 'all', a list of indices or a count; got {channels!r}")
        return list(range(n))
    if isinstance(channels, bool):
        raise InvalidArgument(f"{what}s must be 'all', a list of indices or a count")
    if isinstance(channels, int):
        if channels < 1:
            raise InvalidArgument(f"top-N {what}s: N must be at least 1; got {channels}")
        channels = min(channels, n)  # like a LIMIT: asking for more than there are gives them all
        # Stable sort: ties keep the lower index first, so the answer is deterministic.
        order = torch.sort(strength.detach().cpu(), descending=True, stable=True).indices
        return [int(i) for i in order[:channels]]
    chosen = [int(c) for c in channels]
    if not chosen:
        raise InvalidArgument(f"the {what} list is empty; valid {what}s are 0..{n - 1}")
    bad = [c for c in chosen if not 0 <= c < n]
    if bad:
        raise NoSuchChannel(f"{what} {bad[0]} is out of range; valid {what}s are 0..{n - 1}")
    return chosen


def seed_values(act: torch.Tensor, channels: list[int], seed: Seed) -> torch.Tensor:
    """Each chosen channel's seed map (K, h, w) from one image's activation (C, h, w)."""
    _check_choice("seed", seed, SEEDS)
    values = act[torch.tensor(channels, device=act.device)]
    if seed == "argmax":
        flat = values.flatten(1)
        pos = flat.argmax(1, keepdim=True)
        values = torch.zeros_like(flat).scatter_(1, pos, flat.gather(1, pos)).view_as(values)
    return values


def make_seeds(act: torch.Tensor, channels: list[int], mode: Mode, seed: Seed) -> torch.Tensor:
    """Dense seed signals from one image's activation (C, h, w): (K, C, h, w) for mode=each, (1, C, h, w) whole."""
    _check_choice("mode", mode, MODES)
    values = seed_values(act, channels, seed)
    k = len(channels)
    seeds = act.new_zeros(k, *act.shape)
    seeds[torch.arange(k, device=act.device), torch.tensor(channels, device=act.device)] = values
    return seeds.sum(0, keepdim=True) if mode == "whole" else seeds


def _stats(act: torch.Tensor, channels: list[int]) -> tuple[list[float], list[float], list[tuple[int, int]]]:
    flat = act[channels].flatten(1)
    w = act.shape[-1]
    pos = flat.argmax(1).tolist()
    return flat.amax(1).tolist(), flat.mean(1).tolist(), [(int(p) // w, int(p) % w) for p in pos]


def reconstruct(
    model: ResNet18,
    image: torch.Tensor,
    layer: str,
    channels: Channels = "all",
    mode: Mode = "each",
    seed: Seed = "activation",
    rule: Rule = "deconvnet",
    shortcut: Shortcut = "sum",
    chunk: int | None = None,
) -> Reconstruction:
    """Project a layer's activation for one normalised image (3, H, W) back to input space, seeds batched.

    `channels`: "all", a list of indices, or an int N = the N channels with the strongest (max) activation.
    `mode=each`: one projection per channel (that channel kept, the others zeroed); `whole`: one projection of
    the chosen channels together. `seed=argmax` keeps only each channel's strongest position (its value).
    `chunk`: seeds per reverse pass (default: reverse_speed.auto_chunk).
    """
    _require_eval(model)
    for name, value, choices in (("mode", mode, MODES), ("seed", seed, SEEDS), ("rule", rule, RULES)):
        _check_choice(name, value, choices)
    _check_choice("shortcut", shortcut, SHORTCUTS)
    canon = canonical_layer(layer)
    rev = ReverseResNet(model)
    with torch.no_grad():
        rec = rev.record(as_batch(model, image), upto=canon)
        act = rec.activations[canon][0]
        chosen = select_channels(channels, act.flatten(1).amax(1))
        if mode == "whole":
            proj = rev(make_seeds(act, chosen, mode, seed), rec, canon, rule, shortcut)
        else:
            values = seed_values(act, chosen, seed)
            step = chunk or auto_chunk(rec.activations["conv1"])
            proj = _project_each(rev, rec, canon, values, chosen, rule, shortcut, step)
    amax, amean, pos = _stats(act, chosen)
    return Reconstruction(proj, chosen, canon, tuple(act.shape), amax, amean, pos, mode, seed, rule, shortcut)


def _project_each(
    rev: ReverseResNet,
    rec: ForwardRecord,
    start: str,
    values: torch.Tensor,
    channels: list[int],
    rule: Rule,
    shortcut: Shortcut,
    step: int,
) -> torch.Tensor:
    """One projection (K, 3, H, W) per seed map values[k] in channel channels[k], `step` seeds a pass.

    An all-zero seed projects to exactly zero (the network has no biases), so only the others run.
    """
    keep, kept = live_seeds(values), channels
    if keep is not None:
        values, kept = values[keep], [channels[i] for i in keep.tolist()]
    parts = [
        rev.forward_channels(values[i : i + step], kept[i : i + step], rec, start, rule, shortcut)
        for i in range(0, len(kept), step)
    ]
    if keep is None:
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    proj = values.new_zeros(len(channels), rev.model.conv1.in_channels, *rec.sizes["conv1"])
    if parts:
        proj[keep] = torch.cat(parts)
    return proj


def project_classes(
    model: ResNet18,
    image: torch.Tensor,
    classes: Literal["all"] | list[int] | int | None = None,
    rule: Rule = "deconvnet",
    shortcut: Shortcut = "sum",
) -> Reconstruction:
    """Project class scores (a one-hot of 1.0 at each class's logit) to input space; None = the predicted class.

    An int N picks the N highest-scoring classes. `activation_max`/`activation_mean` hold each class's logit.
    """
    _require_eval(model)
    rev = ReverseResNet(model)
    with torch.no_grad():
        rec = rev.record(as_batch(model, image))
        assert rec.logits is not None
        logits = rec.logits[0]
        chosen = select_channels(1 if classes is None else classes, logits, what="class")
        seeds = logits.new_zeros(len(chosen), logits.shape[0])
        seeds[torch.arange(len(chosen)), torch.tensor(chosen)] = 1.0
        proj = rev(seeds, rec, "logits", rule, shortcut)
    scores = [float(logits[c]) for c in chosen]
    return Reconstruction(
        proj,
        chosen,
        "logits",
        tuple(logits.shape),
        scores,
        scores,
        [(0, 0)] * len(chosen),
        "each",
        "class",
        rule,
        shortcut,
    )


def project_positions(
    model: ResNet18,
    images: torch.Tensor,
    layer: str,
    channel: int,
    positions: list[tuple[int, int]],
    rule: Rule = "deconvnet",
    shortcut: Shortcut = "sum",
) -> torch.Tensor:
    """For K normalised images (K, 3, H, W), project channel `channel` seeded only at each image's (row, col).

    The seed keeps the activation's value there (Zeiler-Fergus top-k hits); one batched pass -> (K, 3, H, W).
    """
    _require_eval(model)
    canon = canonical_layer(layer)
    if images.dim() != 4 or images.shape[0] != len(positions):
        raise InvalidArgument(f"need one (row, col) per image; got {len(positions)} for shape {tuple(images.shape)}")
    p = next(model.parameters())
    rev = ReverseResNet(model)
    with torch.no_grad():
        rec = rev.record(images.to(device=p.device, dtype=p.dtype), upto=canon)
        act = rec.activations[canon]
        if not 0 <= channel < act.shape[1]:
            raise InvalidArgument(f"channel {channel} is out of range; valid channels are 0..{act.shape[1] - 1}")
        h, w = act.shape[-2:]
        bad = [(r, c) for r, c in positions if not (0 <= r < h and 0 <= c < w)]
        if bad:
            raise InvalidArgument(f"position {bad[0]} is outside the {h}x{w} map of {canon}")
        k = torch.arange(len(positions))
        rows = torch.tensor([r for r, _ in positions])
        cols = torch.tensor([c for _, c in positions])
        values = torch.zeros_like(act[:, channel])
        values[k, rows, cols] = act[k, channel, rows, cols]
        return rev.forward_channels(values, [channel] * len(positions), rec, canon, rule, shortcut)
