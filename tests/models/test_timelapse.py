"""Training across time: conv1 snapshots every epoch, per-layer statistics, the GIF, and resume after a kill."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from models import render
from models.config import TrainConfig
from models.resnet import build_model
from models.runs import MetricsLog
from models.timelapse import (
    STAT_LAYERS,
    Method,
    filters_gif,
    filters_image,
    list_snapshots,
    load_snapshot,
    snapshot_path,
)
from models.trainer import train
from tests.helpers import ROOT
from tests.worker.conftest import wait_for

EPOCHS = 2
SMALL: dict[str, Any] = dict(batch_size=50, val_size=100, train_limit=200, log_every=2, milestones=[2], gamma=0.5)


def layer_records(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if r["kind"] == "layers"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> Path:
    """One run of EPOCHS epochs on the synthetic data, TensorBoard on."""
    run_dir = tmp_path_factory.mktemp("lapse") / "run"
    result = train(TrainConfig(epochs=EPOCHS, **SMALL), run_dir, synthetic_data, device="cpu", tensorboard=True)
    assert result.status == "succeeded"
    return run_dir


def test_snapshots_for_every_epoch_from_the_initialisation(run: Path) -> None:
    snaps = list_snapshots(run)
    assert list(snaps) == list(range(EPOCHS + 1))
    weights = {e: load_snapshot(p) for e, p in snaps.items()}
    assert all(w.shape == (64, 3, 7, 7) and w.dtype == torch.float32 for w in weights.values())
    torch.manual_seed(0)  # the config's seed: epoch 0 is the model as built, before any step
    torch.testing.assert_close(weights[0], build_model("resnet18").conv1.weight.detach())
    last = load_file(str(run / "checkpoints" / f"epoch-{EPOCHS:04d}.safetensors"))["conv1.weight"]
    torch.testing.assert_close(weights[EPOCHS], last)  # the epoch's snapshot is that epoch's weights
    assert not torch.equal(weights[0], weights[EPOCHS])
    assert all(not torch.equal(weights[e - 1], weights[e]) for e in range(1, EPOCHS + 1))


def test_statistics_for_every_named_layer_every_epoch(run: Path) -> None:
    recs = layer_records(run)
    assert [r["epoch"] for r in recs] == list(range(EPOCHS + 1))
    for r in recs:
        assert set(r["layers"]) == set(STAT_LAYERS)
        for layer, stats in r["layers"].items():
            want = {"weight_norm", "act_mean"} | ({"grad_norm", "update_ratio"} if r["epoch"] else set())
            want |= {"dead"} if layer != "fc" else set()  # fc has no ReLU
            assert set(stats) == want, (r["epoch"], layer, stats)
            assert all(math.isfinite(v) for v in stats.values()), stats
            assert stats["weight_norm"] > 0 and 0 <= stats.get("dead", 0) <= 1
            if r["epoch"]:
                assert stats["grad_norm"] > 0 and 0 < stats["update_ratio"] < 10
        assert len(r["dead_by_relu"]) == 17 and "layer4.1.relu2" in r["dead_by_relu"]  # stem + 4 stages x 4
        assert 0 < r["seconds"] < 60  # what measuring cost
    # The init record is committed with epoch 1: it carries epoch 1's step, so resume truncation treats them alike.
    epoch1 = next(r for r in MetricsLog(run / "metrics.jsonl").read() if r["kind"] == "epoch")
    assert recs[0]["step"] == recs[1]["step"] == epoch1["step"]
    # The weight norm is the norm of the snapshot for conv1: the numbers describe the weights saved.
    conv1 = load_snapshot(snapshot_path(run, EPOCHS))
    assert recs[-1]["layers"]["conv1"]["weight_norm"] == pytest.approx(float(conv1.norm()), rel=1e-5)


def test_tensorboard_scalars_and_weight_histograms(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    for layer in STAT_LAYERS:
        assert [h.step for h in acc.Histograms(f"weights/{layer}")] == list(range(EPOCHS + 1))
        assert [s.step for s in acc.Scalars(f"layers/weight_norm/{layer}")] == list(range(EPOCHS + 1))
    assert "layers/update_ratio/layer4" in tags["scalars"] and "layers/dead/conv1" in tags["scalars"]


def test_gif_has_a_frame_per_snapshot(run: Path) -> None:
    snaps = [(e, load_snapshot(p)) for e, p in list_snapshots(run).items()]
    gif = Image.open(io.BytesIO(filters_gif(snaps, "channels")))
    assert gif.format == "GIF" and getattr(gif, "n_frames", 1) == EPOCHS + 1
    first = gif.convert("RGB").tobytes()
    gif.seek(EPOCHS)
    assert gif.convert("RGB").tobytes() != first


@pytest.mark.parametrize("method", ["channels", "rgb"])
def test_fixed_scale_image_is_the_seed_figure(run: Path, method: Method) -> None:
    """At vmax = max|W| the fixed-scale picture is, pixel for pixel, the /filters figure; another vmax is not."""
    w = load_snapshot(snapshot_path(run, EPOCHS))
    seed = render.filters_rgb_png(w) if method == "rgb" else render.filters_channels_png(w)
    seed_px = torch.from_numpy(np.array(Image.open(io.BytesIO(seed)).convert("RGB")))

    def pixels(vmax: float) -> torch.Tensor:
        return (filters_image(w, method, vmax) * 255).round().to(torch.uint8).permute(1, 2, 0)

    assert torch.equal(pixels(float(w.abs().max())), seed_px)
    assert not torch.equal(pixels(2 * float(w.abs().max())), seed_px)


def test_statistics_do_not_change_the_training(run: Path, tmp_path: Path, synthetic_data: Path) -> None:
    """The same run without them trains to the same weights (the probe and the norms touch nothing), and
    leaves neither snapshots nor `layers` records."""
    off = tmp_path / "off"
    train(TrainConfig(epochs=EPOCHS, **SMALL), off, synthetic_data, device="cpu", tensorboard=False, timelapse=False)
    name = f"epoch-{EPOCHS:04d}.safetensors"
    a, b = load_file(str(run / "checkpoints" / name)), load_file(str(off / "checkpoints" / name))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert list_snapshots(off) == {} and layer_records(off) == []


CHILD = """
import sys, time
from pathlib import Path
import torch
from models.config import TrainConfig
from models.trainer import train
torch.set_num_threads(1)
marker = Path(sys.argv[4])
def progress(p):
    if p.get("phase") == "train" and p.get("epoch") == 2:  # mid epoch 2, epoch 1 committed: wait for the kill
        marker.touch()
        time.sleep(600)
train(TrainConfig.model_validate_json(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), device="cpu",
      progress=progress, tensorboard=False)
"""


def test_resume_after_a_kill_keeps_every_snapshot_and_adds_the_rest(tmp_path: Path, synthetic_data: Path) -> None:
    cfg = TrainConfig(epochs=EPOCHS, **SMALL)
    run_dir, marker = tmp_path / "run", tmp_path / "in-epoch-2"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", CHILD, cfg.model_dump_json(), str(run_dir), str(synthetic_data), str(marker)]
    child = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: marker.exists() or child.poll() is not None, 180, "the child in epoch 2")
        assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    assert list(list_snapshots(run_dir)) == [0, 1]
    kept = {e: (p.stat().st_mtime_ns, p.read_bytes()) for e, p in list_snapshots(run_dir).items()}
    # What a killed attempt can leave past its commit: a snapshot of an uncommitted epoch, a write in flight.
    stale = snapshot_path(run_dir, 2)
    stale.write_bytes(kept[1][1])
    torn = stale.with_name(f".{stale.name}.abc123.tmp")
    torn.write_bytes(b"half a snapshot")
    assert list(list_snapshots(run_dir)) == [0, 1, 2]  # a temp file is never listed

    seen: list[list[int]] = []

    def progress(p: dict[str, Any]) -> None:
        if p.get("phase") == "train" and not seen:
            seen.append(list(list_snapshots(run_dir)))

    result = train(cfg, run_dir, synthetic_data, device="cpu", progress=progress, tensorboard=False)
    assert result.status == "succeeded" and result.epoch == EPOCHS
    assert seen == [[0, 1]]  # the uncommitted epoch's snapshot went before training went on
    snaps = list_snapshots(run_dir)
    assert list(snaps) == list(range(EPOCHS + 1)) and not torn.exists()
    for e, (mtime, data) in kept.items():  # untouched: the same file, the same bytes
        assert snaps[e].stat().st_mtime_ns == mtime and snaps[e].read_bytes() == data
    assert [r["epoch"] for r in layer_records(run_dir)] == list(range(EPOCHS + 1))  # once each
    assert json.loads((run_dir / "checkpoints" / f"epoch-{EPOCHS:04d}.json").read_text())["epoch"] == EPOCHS
