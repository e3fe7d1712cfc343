"""Precision choice: bf16 autocast on CUDA, and on a CPU only when asked for and the CPU has bf16 instructions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.config import PRESETS, TrainConfig
from models.device import cpu_bf16_flags, use_bf16
from models.trainer import train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_bf16_only_where_asked_and_supported() -> None:
    assert use_bf16(CPU, "bf16", cpu_flags=("avx512_bf16",)) and use_bf16(CPU, "bf16", cpu_flags=("amx_bf16",))
    assert not use_bf16(CPU, "bf16", cpu_flags=())  # a CPU without bf16 instructions stays float32
    assert not use_bf16(CPU, "auto", cpu_flags=("amx_bf16",)) and not use_bf16(CPU, "fp32", cpu_flags=("amx_bf16",))
    assert use_bf16(CUDA, "auto") and use_bf16(CUDA, "bf16") and not use_bf16(CUDA, "fp32")


def test_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    zen4, old = tmp_path / "zen4", tmp_path / "old"
    zen4.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx2\n\nprocessor\t: 1\n")
    old.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_bf16_flags(zen4) == ("avx512_bf16",)
    assert cpu_bf16_flags(old) == ()
    assert cpu_bf16_flags(tmp_path / "missing") == ()


@pytest.mark.slow
def test_cpu_cifar_preset_runs_a_few_steps(
    tmp_path: Path, synthetic_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = TrainConfig.model_validate(
        {**PRESETS["cpu-cifar-bf16"], "epochs": 1, "batch_size": 32, "train_limit": 64, "val_size": 32}
    )
    assert cfg.arch == "resnet18-cifar" and cfg.precision == "bf16"
    with caplog.at_level("INFO", logger="convlens.trainer"):
        result = train(cfg, tmp_path, synthetic_data, device="cpu", tensorboard=False)
    assert result.status == "succeeded" and result.step == 2 and "test_acc_tta" in result.metrics
    chosen = "bf16" if cpu_bf16_flags() else "fp32"  # what this machine's CPU allows
    assert any(f"cpu, {chosen} (precision=bf16" in r.getMessage() for r in caplog.records), caplog.text
    assert "training steps compiled with torch.compile" in caplog.text  # the preset compiles where g++ exists
