#!/usr/bin/env bash
# The GPU proof, in one go on one GPU (under 10 minutes on an H200): every CUDA path, one line per figure.
#
#   scripts/gpu-check.sh [--data DIR]   train the gpu-cifar preset on CUDA to a stated test accuracy, then through
#                                       the real server (uvicorn, CONVLENS_DEVICE=cuda): /predict throughput and
#                                       p50/p99 under concurrent load, the reverse pass (/reconstruct) and /explain.
#                                       Needs a CUDA device and CIFAR-10 under DIR (default var/data; `convlens data`).
#   scripts/gpu-check.sh --smoke        the same steps, tiny, on whatever device there is (the CPU in CI), on
#                                       synthetic data: a check that the proof itself runs, in well under a minute.
#
# Exit status: 0 when every step answered and (full run) the accuracy target was met; 1 when a step failed;
# 2 when the full run finds no CUDA device or no dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
exec "$PY" - "$@" <<'PYEOF'
"""gpu-check: the steps, driven from Python (see scripts/gpu-check.sh)."""

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, os.getcwd())
from models.data import load_cifar  # noqa: E402
from models.runs import RunStore  # noqa: E402
from models.synthetic import write_synthetic_cifar  # noqa: E402
from tests.helpers import png_bytes, start_server  # noqa: E402

TARGET_ACC = 0.93  # gpu-cifar (CIFAR stem, bf16, 30 epochs): the accuracy the full run must reach on the test set
FULL: dict[str, Any] = {"train": ["--epochs", "30"], "clients": 64, "seconds": 20.0, "timeout": 540}
SMOKE: dict[str, Any] = {"train": ["--epochs", "1", "--train-limit", "64", "--batch-size", "32", "--val-size", "32"],
         "clients": 4, "seconds": 1.5, "timeout": 240}  # fmt: skip


def line(name: str, text: str) -> None:
    """One figure, one line."""
    print(f"gpu-check {name}: {text}", flush=True)


def train(home: Path, data: Path, device: str, extra: list[str], timeout: float) -> dict[str, Any]:
    """`convlens train --preset gpu-cifar` into the run store; the finished run."""
    cmd = [sys.executable, "-m", "convlens", "train", "--preset", "gpu-cifar", "--home", str(home), "--data",
           str(data), "--device", device, "--run-id", "gpucheck", *extra]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    run = RunStore(home).read_run("gpucheck") if RunStore(home).exists("gpucheck") else {}
    run["wall_s"] = time.perf_counter() - t0
    if proc.returncode or run.get("status") != "succeeded":
        sys.exit(f"gpu-check train: FAILED ({proc.returncode})\n{proc.stderr[-3000:]}")
    return run


async def load(url: str, pngs: list[bytes], clients: int, seconds: float) -> tuple[list[float], int]:
    """`clients` connections posting one PNG each, back to back, for `seconds`: latencies (s) and errors."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(i: int, c: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await c.post("/predict", files={"files": ("x.png", pngs[i % len(pngs)], "image/png")})
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200
            i += clients

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
        await asyncio.gather(*(client(i, c) for i in range(clients)))
    return latencies, errors


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of latencies in seconds, in milliseconds."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def serve_steps(home: Path, data: Path, device: str, cfg: dict[str, Any], logs: Path) -> int:
    """/predict under load, /reconstruct and /explain through a real server; returns the failures."""
    ds = load_cifar(data, "cifar10", train=False)
    pngs = [png_bytes(ds.images[i].permute(1, 2, 0).numpy()) for i in range(min(256, len(ds)))]
    env = {"CONVLENS_DEVICE": device, "CONVLENS_SHIPPED_MODELS": "false", "CONVLENS_EMBEDDED_WORKER": "false"}
    env["CONVLENS_PREDICT_ENGINE"] = "auto"  # what production runs: torch on CUDA, the compiled engine on a CPU
    failures = 0
    with start_server(home, data, env=env, log_dir=logs, torch_threads=None, timeout=180) as srv:
        info = httpx.get(srv.url + "/models/gpucheck").json().get("predict_engine") or {}
        line("engine", f"/predict served by {info.get('engine')} {info.get('precision') or ''} on {device}".strip())
        asyncio.run(load(srv.url, pngs, cfg["clients"], min(2.0, cfg["seconds"])))  # warm-up
        lat, errors = asyncio.run(load(srv.url, pngs, cfg["clients"], cfg["seconds"]))
        line("predict", f"{len(lat) / cfg['seconds']:.0f} req/s at concurrency {cfg['clients']}, p50 "
             f"{pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, {errors} errors of {len(lat)}")  # fmt: skip
        failures += errors > 0 or not lat
        one = {"file": ("x.png", pngs[0], "image/png")}
        for name, path in (("reconstruct", "/reconstruct?layer=layer2&channels=top:8&format=json"),
                           ("explain", "/explain?method=gradcam&format=json")):  # fmt: skip
            t0 = time.perf_counter()
            r = httpx.post(srv.url + path, files=one, timeout=120)
            line(name, f"HTTP {r.status_code} in {(time.perf_counter() - t0) * 1000:.0f} ms on {device}"
                 + ("" if r.status_code == 200 else f": {r.text[:300]}"))  # fmt: skip
            failures += r.status_code != 200
    return failures


def main() -> int:
    """The steps in order; the exit status (see the header)."""
    ap = argparse.ArgumentParser(prog="scripts/gpu-check.sh")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--data", type=Path, default=Path("var/data"))
    args = ap.parse_args()
    cfg = SMOKE if args.smoke else FULL
    if not args.smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it where one is, or `scripts/gpu-check.sh --smoke`")
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    line("device", f"{name}; torch {torch.__version__}; {'smoke (tiny)' if args.smoke else 'full'}")
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        data = args.data
        if args.smoke:
            data = tmp / "data"
            write_synthetic_cifar(data, "cifar10", n_train=128, n_test=32)
        elif not (data / "cifar-10-batches-py").is_dir():
            print(f"gpu-check: no CIFAR-10 under {data}: `convlens data --dest {data}` first")
            return 2
        run = train(tmp / "home", data, device, cfg["train"], cfg["timeout"])
        acc = float((run.get("metrics") or {}).get("test_acc", 0.0))
        verdict = "" if args.smoke else (" PASS" if acc >= TARGET_ACC else " FAIL")
        line("train", f"gpu-cifar test accuracy {acc:.2%} (target {TARGET_ACC:.0%}{verdict}) in {run['wall_s']:.0f} s "
             f"on {device}")  # fmt: skip
        failures = serve_steps(tmp / "home", data, device, cfg, tmp)
        failures += not args.smoke and acc < TARGET_ACC
        line("result", "PASS" if not failures else f"FAIL ({failures} failed)")
        return 1 if failures else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


sys.exit(main())
PYEOF
