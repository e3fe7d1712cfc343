"""`convlens train`: the local trainer's command line, end to end in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convlens.main import main
from models.runs import RunStore


@pytest.mark.slow
def test_train_command_runs_into_the_store(
    tmp_path: Path, synthetic_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "train",
            "--home",
            str(tmp_path),
            "--data",
            str(synthetic_data),
            "--device",
            "cpu",
            "--run-id",
            "cli1",
            "--epochs",
            "1",
            "--batch-size",
            "50",
            "--train-limit",
            "200",
            "--val-size",
            "100",
            "--milestones",
            "--no-flip",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    run = RunStore(tmp_path).read_run("cli1")
    assert run["status"] == "succeeded" and run["config"]["flip"] is False and run["config"]["milestones"] == []
    assert json.loads(out[out.index("{") :])["metrics"]["test_acc"] > 0.3
    assert (tmp_path / run["best_checkpoint"]).with_suffix(".safetensors").is_file()


def test_invalid_option_is_refused_with_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--home", str(tmp_path), "--epochs", "0"]) == 2
    assert "epochs" in capsys.readouterr().err
