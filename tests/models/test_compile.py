"""`compile=true`: the training steps run through torch.compile, take the same steps as eager ones, and a machine
that cannot build kernels trains eager and says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._inductor import config as inductor_config

from models.config import PRESETS, TrainConfig
from models.trainer import _CompiledForward, train

TINY = {"epochs": 1, "batch_size": 32, "train_limit": 96, "val_size": 32, "log_every": 1, "optimizer": "sgd"}


def step_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"]


@pytest.mark.slow
def test_compiled_steps_take_the_same_steps_as_eager_ones(
    tmp_path: Path, synthetic_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = {}
    for compiled in (False, True):
        cfg = TrainConfig.model_validate({**TINY, "compile": compiled, "precision": "fp32"})
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with caplog.at_level("INFO", logger="convlens.trainer"):
            result = train(cfg, tmp_path / str(compiled), synthetic_data, device="cpu", tensorboard=False)
        assert result.status == "succeeded" and result.step == 3
        runs[compiled] = step_losses(tmp_path / str(compiled))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs >= 1 if compiled else graphs == 0  # inductor built the steps' graph only when asked
    assert "training steps compiled with torch.compile" in caplog.text and "torch.compile failed" not in caplog.text
    assert len(runs[True]) == 3
    # Same initial weights, same batches, same optimiser: only the kernels differ (fused, reordered sums).
    assert runs[True] == pytest.approx(runs[False], rel=1e-3), runs
    assert runs[True][0] != runs[True][-1]  # the steps did move the weights


def test_without_a_compiler_the_steps_run_eager_and_the_log_says_why(
    tmp_path: Path, synthetic_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = TrainConfig.model_validate({**TINY, "compile": True, "train_limit": 32})
    # torch's own config patch: this machine's inductor is told to look for a compiler that is not there.
    with inductor_config.patch({"cpp.cxx": (None, "no-such-c++")}), caplog.at_level("INFO", logger="convlens.trainer"):
        result = train(cfg, tmp_path, synthetic_data, device="cpu", tensorboard=False)
    assert result.status == "succeeded"
    assert "compile=true, but no C++ compiler ('no-such-c++' is not on PATH): training steps run eager" in caplog.text
    assert "training steps compiled" not in caplog.text


def test_a_failed_compile_is_logged_and_the_step_runs_eager(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(2, 3, 8, 8)
    forward = _CompiledForward(model)
    # The compiler disappears between the check and the first step: inductor's code generation fails.
    with inductor_config.patch({"cpp.cxx": (None, "no-such-c++")}), caplog.at_level("WARNING", "convlens.trainer"):
        out = forward(x)
    assert torch.equal(out, model(x)) and forward.fn is None  # eager from now on
    assert "torch.compile failed (InductorError: InvalidCxxCompiler" in caplog.text
    assert "\n" not in caplog.records[-1].getMessage()  # one line in the log, not inductor's whole advice


def test_the_cpu_cifar_preset_compiles_and_the_gpu_preset_does_not() -> None:
    assert PRESETS["cpu-cifar-bf16"]["compile"] is True and PRESETS["gpu-cifar"]["compile"] is False
    assert TrainConfig().compile is False  # the seed's recipe: eager
