#!/usr/bin/env bash
# The GPU proof, in one go on one GPU (under 10 minutes on an H200): every CUDA path, one line per figure.
#
#   scripts/gpu-check.sh [--data DIR]   train the gpu-cifar preset on CUDA to a stated test accuracy, then through
#                                       the real server (uvicorn, CONVLENS_DEVICE=cuda): /predict throughput and
#                                       p50/p99 under concurrent load, the reverse pass (/reconstruct) and /explain,
#                                       then /predict through `convlens serve` with 4 API processes (--api-processes).
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
import multiprocessing
import os
import re
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
from tests.helpers import SERVE, png_bytes, start_server  # noqa: E402

TARGET_ACC = 0.93  # the preset gpu-cifar as it stands: the accuracy the full run must reach on the test set
FULL: dict[str, Any] = {"train": [], "clients": 64, "seconds": 15.0, "timeout": 540, "api_processes": 4}
SMOKE: dict[str, Any] = {"train": ["--epochs", "1", "--train-limit", "64", "--batch-size", "32", "--val-size", "32"],
         "clients": 4, "seconds": 1.5, "timeout": 240, "api_processes": 1}  # fmt: skip


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


def predict_request(png: bytes) -> bytes:
    """One keep-alive HTTP/1.1 POST /predict of one PNG as multipart, as raw bytes."""
    head = b'--gpucheck\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\nContent-Type: image/png'
    body = head + b"\r\n\r\n" + png + b"\r\n--gpucheck--\r\n"
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: multipart/form-data; boundary=gpucheck\r\n\r\n").encode() + body  # fmt: skip


async def connections(port: int, reqs: list[bytes], first: int, step: int, n: int, stop: float) -> tuple[list, int]:
    """`n` connections, each posting back to back until `stop` (time.time()): latencies (s) and non-200 answers."""
    latencies: list[float] = []
    errors = 0

    async def one(k: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.time() < stop:
            t0 = time.perf_counter()
            writer.write(reqs[k % len(reqs)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            await reader.readexactly(int(length[1]) if length else 0)
            latencies.append(time.perf_counter() - t0)
            errors += not head.startswith(b"HTTP/1.1 200")
            k += step
        writer.close()

    await asyncio.gather(*(one(first + j) for j in range(n)))
    return latencies, errors


def load(port: int, pngs: list[bytes], clients: int, seconds: float) -> tuple[list[float], int]:
    """`clients` keep-alive connections spread over client processes (a quarter of the cores, so the client is
    never what limits the server), each posting one PNG at a time for `seconds`: latencies (s) and errors."""
    reqs = [predict_request(p) for p in pngs]
    procs = max(1, min(clients, (os.cpu_count() or 1) // 4))
    stop = time.time() + seconds + 0.5  # every process starts its clock together, after forking
    ctx = multiprocessing.get_context("fork")  # the parent's script is stdin: spawn could not re-import it
    with ctx.Pool(procs) as pool:
        shares = [clients // procs + (i < clients % procs) for i in range(procs)]
        args = [(port, reqs, sum(shares[:i]), clients, n, stop) for i, n in enumerate(shares)]
        results = pool.starmap(_run_connections, args)
    return [x for lat, _ in results for x in lat], sum(e for _, e in results)


def _run_connections(*args: Any) -> tuple[list[float], int]:
    """A client process: its share of the connections."""
    return asyncio.run(connections(*args))


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of latencies in seconds, in milliseconds."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def predict_line(srv: Any, pngs: list[bytes], cfg: dict[str, Any], label: str) -> int:
    """/predict under load on a running server: one line; 1 when a request failed."""
    port = int(srv.url.rsplit(":", 1)[1])
    load(port, pngs, cfg["clients"], min(2.0, cfg["seconds"]))  # warm-up
    lat, errors = load(port, pngs, cfg["clients"], cfg["seconds"])
    line("predict", f"{len(lat) / cfg['seconds']:.0f} req/s at concurrency {cfg['clients']} ({label}), p50 "
         f"{pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, {errors} errors of {len(lat)}")  # fmt: skip
    return int(errors > 0 or not lat)


def serve_steps(home: Path, data: Path, device: str, cfg: dict[str, Any], logs: Path) -> int:
    """/predict under load, /reconstruct and /explain through a real server; then /predict through `convlens
    serve` with several API processes when asked; returns the failures."""
    ds = load_cifar(data, "cifar10", train=False)
    pngs = [png_bytes(ds.images[i].permute(1, 2, 0).numpy()) for i in range(min(256, len(ds)))]
    env = {"CONVLENS_DEVICE": device, "CONVLENS_SHIPPED_MODELS": "false", "CONVLENS_EMBEDDED_WORKER": "false"}
    env["CONVLENS_PREDICT_ENGINE"] = "auto"  # what production runs: torch on CUDA, the compiled engine on a CPU
    failures = 0
    with start_server(home, data, env=env, log_dir=logs, torch_threads=None, timeout=180) as srv:
        info = httpx.get(srv.url + "/models/gpucheck").json().get("predict_engine") or {}
        line("engine", f"/predict served by {info.get('engine')} {info.get('precision') or ''} on {device}".strip())
        failures += predict_line(srv, pngs, cfg, "1 API process")
        one = {"file": ("x.png", pngs[0], "image/png")}
        for name, path in (("reconstruct", "/reconstruct?layer=layer2&channels=top:8&format=json"),
                           ("explain", "/explain?method=gradcam&format=json")):  # fmt: skip
            t0 = time.perf_counter()
            r = httpx.post(srv.url + path, files=one, timeout=120)
            line(name, f"HTTP {r.status_code} in {(time.perf_counter() - t0) * 1000:.0f} ms on {device}"
                 + ("" if r.status_code == 200 else f": {r.text[:300]}"))  # fmt: skip
            failures += r.status_code != 200
    if cfg["api_processes"] > 1:
        many = {**env, "CONVLENS_API_PROCESSES": str(cfg["api_processes"])}
        with start_server(home, data, env=many, log_dir=logs, torch_threads=None, timeout=240, app=SERVE) as srv:
            failures += predict_line(srv, pngs, cfg, f"{cfg['api_processes']} API processes, `convlens serve`")
    return failures


def main() -> int:
    """The steps in order; the exit status (see the header)."""
    ap = argparse.ArgumentParser(prog="scripts/gpu-check.sh")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--data", type=Path, default=Path("var/data"))
    ap.add_argument("--api-processes", type=int, help="also load `convlens serve` with N API processes (full: 4)")
    args = ap.parse_args()
    cfg = {**(SMOKE if args.smoke else FULL)}
    cfg["api_processes"] = args.api_processes or cfg["api_processes"]
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
