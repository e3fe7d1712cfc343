"""The trainer on synthetic data: it learns, logs, checkpoints, cancels and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from models.checkpoints import load_checkpoint
from models.config import PRESETS, TrainConfig
from models.runs import MetricsLog
from models.trainer import train

SMALL = dict(batch_size=50, val_size=100, train_limit=300, log_every=2, milestones=[1], gamma=0.5)


def test_one_epoch_learns_and_writes_everything(tmp_path: Path, synthetic_data: Path) -> None:
    cfg = TrainConfig(epochs=1, **SMALL)  # type: ignore[arg-type]
    seen: list[dict[str, Any]] = []
    result = train(cfg, tmp_path, synthetic_data, device="cpu", progress=seen.append, tensorboard=True)
    assert result.status == "succeeded" and result.step == 6
    assert result.metrics["test_acc"] > 0.5, result.metrics  # chance is 0.1
    ck = tmp_path / "checkpoints"
    assert {p.name for p in ck.iterdir()} >= {
        "epoch-0001.safetensors",
        "epoch-0001.json",
        "best.safetensors",
        "best.json",
        "state.pt",
    }
    model, meta = load_checkpoint(ck / "best")
    assert meta["metrics"]["test_acc"] == result.metrics["test_acc"] and meta["classes"][0] == "airplane"
    assert meta["mean"] == [0.4914, 0.4822, 0.4465] and meta["config"]["train_limit"] == 300
    recs = MetricsLog(tmp_path / "metrics.jsonl").read()
    kinds = [r["kind"] for r in recs]
    assert kinds.count("step") == 3 and kinds.count("epoch") == 1 and kinds[-1] == "final"
    assert [r["step"] for r in recs if r["kind"] == "step"] == [2, 4, 6]
    assert {"epoch", "loss", "acc", "lr", "images_per_s", "eta_s"} <= set(seen[0])
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


@pytest.mark.slow
def test_dataloader_path_trains_too(tmp_path: Path, synthetic_data: Path) -> None:
    cfg = TrainConfig(epochs=1, loader="dataloader", **SMALL)  # type: ignore[arg-type]
    result = train(cfg, tmp_path, synthetic_data, device="cpu", tensorboard=False)
    assert result.status == "succeeded" and result.metrics["test_acc"] > 0.5


@pytest.mark.slow
def test_cancel_stops_between_steps(tmp_path: Path, synthetic_data: Path) -> None:
    cfg = TrainConfig(epochs=3, **SMALL)  # type: ignore[arg-type]
    calls = iter(range(1000))
    result = train(
        cfg, tmp_path, synthetic_data, device="cpu", should_cancel=lambda: next(calls) >= 8, tensorboard=False
    )
    assert result.status == "cancelled" and result.step == 9 and result.epoch == 1
    assert (tmp_path / "checkpoints" / "epoch-0001.safetensors").is_file()  # the finished epoch is kept
    assert not (tmp_path / "checkpoints" / "epoch-0002.safetensors").exists()


class Crash(Exception):
    pass


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path: Path, synthetic_data: Path) -> None:
    torch.use_deterministic_algorithms(True)
    try:
        cfg = TrainConfig(epochs=2, **SMALL)  # type: ignore[arg-type]
        straight = train(cfg, tmp_path / "a", synthetic_data, device="cpu", tensorboard=False)

        def crash_after_first_epoch(p: dict[str, Any]) -> None:
            if p.get("phase") == "epoch" and p["epoch"] == 1:
                raise Crash  # as if the process died right after the epoch's checkpoint

        with pytest.raises(Crash):
            train(
                cfg, tmp_path / "b", synthetic_data, device="cpu", progress=crash_after_first_epoch, tensorboard=False
            )
        resumed = train(cfg, tmp_path / "b", synthetic_data, device="cpu", tensorboard=False)
    finally:
        torch.use_deterministic_algorithms(False)
    assert resumed.step == straight.step == 12
    a = load_file(str(tmp_path / "a" / "checkpoints" / "epoch-0002.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "epoch-0002.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    log_a = [
        json.dumps({k: v for k, v in r.items() if k in ("step", "epoch", "loss", "lr")})
        for r in MetricsLog(tmp_path / "a" / "metrics.jsonl").read()
        if r["kind"] == "step"
    ]
    log_b = [
        json.dumps({k: v for k, v in r.items() if k in ("step", "epoch", "loss", "lr")})
        for r in MetricsLog(tmp_path / "b" / "metrics.jsonl").read()
        if r["kind"] == "step"
    ]
    assert log_a == log_b  # same steps, once each, with the same losses and learning rates


def test_resume_with_other_architecture_is_refused(tmp_path: Path, synthetic_data: Path) -> None:
    from models.errors import CheckpointError

    train(TrainConfig(epochs=1, **SMALL), tmp_path, synthetic_data, device="cpu", tensorboard=False)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="does not fit"):
        train(
            TrainConfig(epochs=2, arch="resnet18-cifar", **SMALL),
            tmp_path,
            synthetic_data,
            device="cpu",  # type: ignore[arg-type]
            tensorboard=False,
        )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name: str) -> None:
    cfg = TrainConfig.model_validate(PRESETS[name])
    assert cfg.epochs >= 1


@pytest.mark.slow
def test_gpu_preset_runs_end_to_end_on_the_cpu(tmp_path: Path, synthetic_data: Path) -> None:
    cfg = TrainConfig.model_validate(
        {**PRESETS["gpu-cifar"], "epochs": 1, "batch_size": 32, "train_limit": 64, "val_size": 32}
    )
    result = train(cfg, tmp_path, synthetic_data, device="auto", tensorboard=False)
    assert result.status == "succeeded" and result.step == 2
    assert "test_acc_tta" in result.metrics  # flip test-time augmentation is reported
