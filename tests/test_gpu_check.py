"""scripts/gpu-check.sh: its smoke run (the GPU proof's steps, tiny, on this machine's device) passes in CI time,
and the full run refuses to pretend on a machine without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """The script as CI runs it, with this interpreter."""
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.slow
def test_smoke_runs_every_step_and_prints_one_line_per_figure() -> None:
    proc = run("--smoke", timeout=280)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    for step in ("device", "train", "engine", "predict", "reconstruct", "explain"):
        assert f"gpu-check {step}: " in out, out
    assert "0 errors" in out and "gpu-check reconstruct: HTTP 200" in out and "gpu-check explain: HTTP 200" in out
    assert out.strip().splitlines()[-1] == "gpu-check result: PASS"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the full run is the proof itself")
def test_the_full_run_says_so_when_there_is_no_gpu() -> None:
    proc = run(timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stdout, proc.stdout + proc.stderr
