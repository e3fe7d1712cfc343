"""Training across time: conv1's weights at every epoch and per-layer statistics every epoch.

Snapshots are `runs/<id>/snapshots/conv1-epoch-NNNN.safetensors`, one small file an epoch (epoch 0 is the
initialisation), each written atomically and never rewritten once its epoch is committed: an epoch's write
touches no other epoch's file, so a kill can lose only the epoch in flight, and each write costs the same at
epoch 1 and epoch 1000. Statistics go into metrics.jsonl as one `layers` record an epoch.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchvision.utils import make_grid

from models import render
from models.atomic import atomic_write_bytes
from models.checkpoints import tidy_checkpoints
from models.data import ArrayDataset, Augment, DeviceLoader, dataset_info
from models.errors import CheckpointError, InvalidArgument

STAT_LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4", "fc")
STATS = ("weight_norm", "grad_norm", "update_ratio", "dead", "act_mean")
SNAPSHOTS = "snapshots"
PROBE_SIZE = 256  # validation images in the fixed probe batch
HIST_BINS = 64
_SNAPSHOT_RE = re.compile(r"conv1-epoch-(\d{4,7})\.safetensors")

Method = Literal["channels", "rgb"]
AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]


# ---- snapshots -------------------------------------------------------------------------------------------------


def snapshot_path(run_dir: Path, epoch: int) -> Path:
    """Where conv1's weights after `epoch` live (epoch 0: at initialisation)."""
    return run_dir / SNAPSHOTS / f"conv1-epoch-{epoch:04d}.safetensors"


def list_snapshots(run_dir: Path) -> dict[int, Path]:
    """Every complete snapshot of a run by epoch, in epoch order (a write in flight is a temp file, not listed)."""
    folder = run_dir / SNAPSHOTS
    if not folder.is_dir():
        return {}
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := _SNAPSHOT_RE.fullmatch(p.name))}
    return dict(sorted(found.items()))


def write_snapshot(run_dir: Path, epoch: int, weight: torch.Tensor, step: int) -> Path:
    """conv1's weights as safetensors (float32), written to a temp name and renamed."""
    tensor = weight.detach().to("cpu", torch.float32).contiguous()
    data = save({"weight": tensor}, metadata={"layer": "conv1", "epoch": str(epoch), "step": str(step)})
    path = snapshot_path(run_dir, epoch)
    atomic_write_bytes(path, data)
    return path


def load_snapshot(path: Path) -> torch.Tensor:
    """A snapshot's weights (out, in, kh, kw), float32; a CheckpointError when the file is missing or not one."""
    try:
        weight = load(path.read_bytes())["weight"]
    except FileNotFoundError as e:
        raise CheckpointError(f"snapshot {path.name} is missing (the run resumed meanwhile?); retry") from e
    except (SafetensorError, KeyError, OSError, ValueError) as e:
        raise CheckpointError(f"snapshot {path.name} is not a conv1 snapshot: {e}") from e
    if weight.dim() != 4:
        raise CheckpointError(f"snapshot {path.name} holds shape {tuple(weight.shape)}, not (out, in, kh, kw)")
    return weight.float()


def drop_snapshots_after(run_dir: Path, epoch: int) -> None:
    """Remove snapshots past `epoch` and temp files: what a killed attempt wrote after its last commit."""
    folder = run_dir / SNAPSHOTS
    if folder.is_dir():
        tidy_checkpoints(folder)
    for e, path in list_snapshots(run_dir).items():
        if e > epoch:
            path.unlink(missing_ok=True)


# ---- statistics ------------------------------------------------------------------------------------------------


def layer_weights(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Each named layer's weight tensors: conv kernels and the fc matrix (BN scales and biases left out)."""
    return {name: [p for p in getattr(model, name).parameters() if p.dim() >= 2] for name in STAT_LAYERS}


def relu_layers(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(named layer, module name, module) of every ReLU, in forward order (the stem's `relu` is conv1's)."""
    out: list[tuple[str, str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            out.append(("conv1" if name == "relu" else name.split(".")[0], name, module))
    return out


def probe_batch(
    ds: ArrayDataset, dataset: str, device: torch.device, resize: int | None, channels_last: bool
) -> torch.Tensor:
    """The first PROBE_SIZE images of a split, normalised as the model sees them in evaluation."""
    info = dataset_info(dataset)
    head = ds.subset(0, min(PROBE_SIZE, len(ds)))
    # Its own loader (no shared generator): the probe must not move the training's random stream.
    loader = DeviceLoader(
        head, len(head), info.mean, info.std, device, Augment(crop=False, flip=False, resize=resize), shuffle=False
    )
    x, _ = next(iter(loader))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def probe_stats(
    model: nn.Module, x: torch.Tensor, autocast: AutocastFactory = contextlib.nullcontext
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One eval-mode forward of `x`: dead fraction per named layer and per ReLU, and each layer's mean output.

    A unit (channel) is dead when it is zero at every position of every probe image. A layer's mean output is
    that of its last ReLU (fc: the logits); its dead fraction pools the channels of all its ReLUs.
    """
    dead_count: dict[str, torch.Tensor] = {}
    width: dict[str, int] = {}
    means: dict[str, torch.Tensor] = {}

    def hook(layer: str, name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def record(_: nn.Module, __: Any, out: torch.Tensor) -> None:
            # A ReLU's output is >= 0: a channel that sums to 0 is zero everywhere, and a sum is the cheaper reduction.
            dead_count[name] = (out.sum(dim=(0, 2, 3)) == 0).sum().float()
            width[name] = out.shape[1]
            means[layer] = out.float().mean()  # the last ReLU of the layer writes last

        return record

    def logits(_: nn.Module, __: Any, out: torch.Tensor) -> None:
        means["fc"] = out.float().mean()

    relus = relu_layers(model)
    handles: list[RemovableHandle] = [m.register_forward_hook(hook(layer, n)) for layer, n, m in relus]
    handles.append(model.get_submodule("fc").register_forward_hook(logits))
    was_training = model.training
    model.eval()
    try:
        with autocast():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    by_relu = {n: dead_count[n] / width[n] for _, n, _ in relus}
    by_layer: dict[str, torch.Tensor] = {}
    for layer in dict.fromkeys(layer for layer, _, _ in relus):
        names = [n for lay, n, _ in relus if lay == layer]
        by_layer[layer] = torch.stack([dead_count[n] for n in names]).sum() / sum(width[n] for n in names)
    return by_layer, by_relu, means


class Timelapse:
    """conv1 snapshots and per-layer statistics for one training session, called by the trainer at fixed points.

    `start` after the restore, `observe_gradients` at each logged step (after backward, before the next
    zero_grad), `end_epoch` before the epoch's records are logged and its resume state saved.
    """

    def __init__(
        self,
        model: nn.Module,
        run_dir: Path,
        probe: torch.Tensor,
        autocast: AutocastFactory = contextlib.nullcontext,
        writer: Any = None,
    ) -> None:
        self.model, self.run_dir, self.probe, self.autocast, self.writer = model, run_dir, probe, autocast, writer
        groups = layer_weights(model)
        self._conv1 = groups["conv1"][0]
        self._params: list[torch.Tensor] = [p for ps in groups.values() for p in ps]
        self._counts = [len(ps) for ps in groups.values()]
        dev = self._params[0].device
        # The weights at the last epoch boundary, one flat buffer a layer (update ratios, histograms), allocated
        # once: allocating ~45 MB afresh every epoch costs more (page faults) than the arithmetic on it.
        self._flat = [torch.empty(sum(p.numel() for p in ps), device=dev) for ps in groups.values()]
        self._prev: list[torch.Tensor] = []
        for buf, ps in zip(self._flat, groups.values(), strict=True):
            offsets = [0, *itertools.accumulate(p.numel() for p in ps)]
            self._prev += [buf[a:b].view(p.shape) for a, b, p in zip(offsets, offsets[1:], ps, strict=False)]
        self._prev_norm = torch.zeros(len(STAT_LAYERS), device=dev)
        self._grad_sum = torch.zeros(len(STAT_LAYERS), device=dev)
        self._grad_steps = 0
        self._spent = 0.0  # host seconds of this epoch's timelapse work so far (each record says its own)
        self._pending: list[dict[str, Any]] = []

    @torch.no_grad()
    def start(self, epoch: int, step: int) -> None:
        """Begin after the restore at `epoch` (0: a fresh run): later snapshots go, the current one is written."""
        t0 = time.perf_counter()
        drop_snapshots_after(self.run_dir, epoch)
        if epoch == 0 or not snapshot_path(self.run_dir, epoch).is_file():
            write_snapshot(self.run_dir, epoch, self._conv1, step)
        if epoch == 0:
            # The initialisation's record is logged with epoch 1's, whose commit (resume state) it shares.
            self._pending.append({**self._record(0, step, {}), "seconds": time.perf_counter() - t0})
        else:
            self._refresh()

    @torch.no_grad()
    def observe_gradients(self) -> None:
        """Add this step's gradient norm per layer to the epoch's mean."""
        t0 = time.perf_counter()
        grads = [p.grad for p in self._params if p.grad is not None]
        if len(grads) == len(self._params):  # a step without gradients (none in this trainer) is not counted
            self._grad_sum += self._per_layer(grads)
            self._grad_steps += 1
        self._spent += time.perf_counter() - t0

    @torch.no_grad()
    def end_epoch(self, epoch: int, step: int) -> list[dict[str, Any]]:
        """Snapshot conv1 and measure every layer; the `layers` records to log (the initialisation's too, once)."""
        t0 = time.perf_counter()
        write_snapshot(self.run_dir, epoch, self._conv1, step)
        torch._foreach_sub_(self._prev, self._params)  # the buffer now holds minus this epoch's update
        extra = {
            "grad_norm": self._grad_sum / max(self._grad_steps, 1),
            "update_ratio": self._per_layer(self._prev) / self._prev_norm.clamp_min(1e-12),
        }
        rec = {**self._record(epoch, step, extra), "seconds": self._spent + time.perf_counter() - t0}
        self._grad_sum.zero_()
        self._grad_steps, self._spent = 0, 0.0
        records = [{**r, "step": step} for r in self._pending] + [rec]
        self._pending = []
        return records

    def _per_layer(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The L2 norm of each named layer's share of `tensors` (aligned with the layers' weights)."""
        sq = torch.stack(torch._foreach_norm(list(tensors))).square()
        return torch.stack([part.sum() for part in sq.split(self._counts)]).sqrt()

    @torch.no_grad()
    def _refresh(self) -> None:
        """The current weights into the epoch-boundary buffers, and their norms."""
        torch._foreach_copy_(self._prev, self._params)
        self._prev_norm = self._per_layer(self._prev)

    def _record(self, epoch: int, step: int, extra: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Measure now: the `layers` record of `epoch`, also written to TensorBoard."""
        self._refresh()
        dead, dead_by_relu, means = probe_stats(self.model, self.probe, self.autocast)
        columns = {"weight_norm": self._prev_norm, **extra, "act_mean": torch.stack([means[n] for n in STAT_LAYERS])}
        scalars = {(layer, stat): col[i] for stat, col in columns.items() for i, layer in enumerate(STAT_LAYERS)}
        scalars |= {(layer, "dead"): v for layer, v in dead.items()}
        scalars |= {(relu, "relu"): v for relu, v in dead_by_relu.items()}
        values = dict(zip(scalars, torch.stack(list(scalars.values())).tolist(), strict=True))  # one device sync
        layers = {n: {s: values[n, s] for s in STATS if (n, s) in values} for n in STAT_LAYERS}
        relus = {relu: values[relu, "relu"] for relu in dead_by_relu}
        self._to_tensorboard(epoch, layers)
        return {
            "kind": "layers",
            "epoch": epoch,
            "step": step,
            "layers": layers,
            "dead_by_relu": relus,
            "time": time.time(),
        }

    def _to_tensorboard(self, epoch: int, layers: dict[str, dict[str, float]]) -> None:
        """Each statistic as a scalar and each layer's weights as a histogram, at step `epoch`."""
        if self.writer is None:
            return
        for layer, stats in layers.items():
            for stat, value in stats.items():
                self.writer.add_scalar(f"layers/{stat}/{layer}", value, epoch)
        for layer, buf in zip(STAT_LAYERS, self._flat, strict=True):
            self.writer.add_histogram(f"weights/{layer}", buf.detach().cpu(), epoch, bins=HIST_BINS)


# ---- pictures --------------------------------------------------------------------------------------------------


def filters_image(weight: torch.Tensor, method: Method, vmax: float, scale: int | None = None) -> torch.Tensor:
    """conv1's filters as render.filters_channels_png / filters_rgb_png draw them, but on the colour scale
    +-vmax instead of the weights' own max|W|, so pictures of several epochs compare: (3, H, W) in [0, 1]."""
    w = weight.detach().float().cpu()
    if method == "rgb" and w.shape[1] != 3:
        raise InvalidArgument(f"method=rgb needs a conv with 3 input channels; this one has {w.shape[1]}")
    s = scale or render.auto_scale(w.shape[2], w.shape[3])
    m = vmax if vmax > 0 else 1.0

    def up(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(s, -2).repeat_interleave(s, -1)

    if method == "rgb":
        return _tiles(up((0.5 + w / (2 * m)).clamp(0, 1)), render.PAD)
    panels = [_tiles(up(render.seismic(w[:, c], m).permute(0, 3, 1, 2)), render.PAD) for c in range(w.shape[1])]
    return _tiles(torch.stack(panels), 4 * render.PAD)


def _tiles(tiles: torch.Tensor, padding: int) -> torch.Tensor:
    _, cols = render.grid_shape(tiles.shape[0])
    return make_grid(tiles, nrow=cols, padding=padding, pad_value=1.0)


def frame_size(weight_shape: Sequence[int], method: Method, scale: int | None = None) -> tuple[int, int]:
    """(height, width) of one GIF frame: the filters' picture under its label band."""
    h, w = (
        render.filters_rgb_size(weight_shape, scale)
        if method == "rgb"
        else render.filters_channels_size(weight_shape, None, scale)
    )
    return h + _band_height(), w


def _band_height() -> int:
    box = ImageFont.load_default().getbbox("epoch 0000")
    return int(box[3] - box[1]) + 6


def _labelled(img: torch.Tensor, text: str) -> Image.Image:
    """A (3, H, W) picture in [0, 1] under a white band that says `text`."""
    arr = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    band = _band_height()
    out = Image.new("RGB", (arr.shape[1], arr.shape[0] + band), (255, 255, 255))
    out.paste(Image.fromarray(arr), (0, band))
    ImageDraw.Draw(out).text((3, 2), text, fill=(0, 0, 0), font=ImageFont.load_default())
    return out


def filters_gif(
    snapshots: Sequence[tuple[int, torch.Tensor]], method: Method, scale: int | None = None, duration_ms: int = 400
) -> bytes:
    """An animated GIF, one frame a snapshot labelled with its epoch, all on one colour scale (the largest
    max|W| of them all), looping; the last frame stays three times as long."""
    if not snapshots:
        raise InvalidArgument("no snapshots to animate")
    vmax = max(float(w.abs().max()) for _, w in snapshots)
    frames = [_labelled(filters_image(w, method, vmax, scale), f"epoch {e}") for e, w in snapshots]
    durations = [duration_ms] * (len(frames) - 1) + [3 * duration_ms]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return buf.getvalue()
