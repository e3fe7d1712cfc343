"""Latency of the look-inside endpoints over HTTP, against the same computation in process (the baseline).

    .venv/bin/python bench/visual_http.py [--data var/data] [--n 40] [--arch resnet18 resnet18-cifar] [--out r.json]

For each stem: starts the real server (`python -m service.server`, its defaults: torch threads = cores - 1,
OMP_WAIT_POLICY=PASSIVE) over a temp run store holding one checkpoint of that arch (untrained weights: the
speed is the same), sends `n` sequential requests per endpoint with one real CIFAR-10 test image (PNG), and
prints p50/p95 latency beside the in-process time of the same call (models/ functions on the same tensor, same
thread count) and the ratio HTTP / in-process. Sequential single requests measure latency, not throughput, so a
Python client is enough here (throughput is bench/serve_predict.py's job, with wrk). The issue's targets (seed
stem): /reconstruct of all 64 conv1 channels under 150 ms p50, the other endpoints under 50 ms.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import explain_render, render  # noqa: E402
from models.checkpoints import save_checkpoint  # noqa: E402
from models.config import TrainConfig  # noqa: E402
from models.data import dataset_info, load_cifar  # noqa: E402
from models.explain import explain  # noqa: E402
from models.resnet import build_model  # noqa: E402
from models.reverse import reconstruct  # noqa: E402
from models.trainer import checkpoint_meta  # noqa: E402
from models.visual import feature_maps, filters  # noqa: E402
from service.images import ImageLimits, prepare  # noqa: E402
from tests.helpers import Server, answers, free_port, wait_for  # noqa: E402


def make_home(arch: str, home: Path, classes: list[str]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    cfg = TrainConfig(arch=arch, epochs=1)  # type: ignore[arg-type]
    stem = home / "registered" / arch
    meta = save_checkpoint(model, stem, checkpoint_meta(cfg, classes, 1, 1, {}))
    (home / "registry.json").write_text(json.dumps({"models": {"bench": f"registered/{arch}"}, "default": "bench"}))
    return meta


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def summary(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"p50": statistics.median(s), "p95": s[min(len(s) - 1, int(0.95 * len(s)))]}


def bench_arch(arch: str, png: bytes, data: Path, n: int, threads: int) -> list[dict[str, Any]]:
    classes = load_cifar(data, "cifar10", train=False).classes
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        meta = make_home(arch, home, classes)
        # In process: the same functions the routes call, on the same tensor, with the server's thread count.
        torch.set_num_threads(threads)
        from models.checkpoints import load_checkpoint

        model, meta = load_checkpoint(home / "registered" / arch)
        x = prepare(png, meta, ImageLimits())
        inproc: dict[str, Callable[[], Any]] = {
            "GET /filters conv1 (png)": lambda: render.filters_channels_png(filters(model, "conv1")),
            "POST /featuremaps conv1 (png)": lambda: render.activation_grid_png(feature_maps(model, x[0], "conv1")),
            "POST /featuremaps layer4 (npy)": lambda: render.npy_bytes(feature_maps(model, x[0], "layer4")),
            "POST /reconstruct conv1 all 64 (png)": lambda: render.projection_grid_png(
                reconstruct(model, x[0], "conv1", "all").projections
            ),
            "POST /reconstruct layer4 top:16 (png)": lambda: render.projection_grid_png(
                reconstruct(model, x[0], "layer4", 16).projections
            ),
            "POST /explain gradcam (png overlay)": lambda: explain_render.overlay_png(
                x[0] * 0 + 0.5, explain(model, x, ["gradcam"], None, "layer4")["gradcam"].heatmap[0]
            ),
        }
        http: dict[str, tuple[str, str, dict[str, Any]]] = {
            "GET /filters conv1 (png)": ("GET", "/filters", {}),
            "POST /featuremaps conv1 (png)": ("POST", "/featuremaps", {"layer": "conv1"}),
            "POST /featuremaps layer4 (npy)": ("POST", "/featuremaps", {"layer": "layer4", "format": "npy"}),
            "POST /reconstruct conv1 all 64 (png)": ("POST", "/reconstruct", {"layer": "conv1", "channels": "all"}),
            "POST /reconstruct layer4 top:16 (png)": (
                "POST",
                "/reconstruct",
                {"layer": "layer4", "channels": "top:16"},
            ),
            "POST /explain gradcam (png overlay)": ("POST", "/explain", {"method": "gradcam", "view": "overlay"}),
            "GET /topk layer3 ch 7 k=9 (json)": ("GET", "/topk", {"layer": "layer3", "channel": 7, "k": 9}),
        }
        base = {k: summary(timed(f, n)) for k, f in inproc.items()}
        port = free_port()
        env = {
            **os.environ,
            "CONVLENS_HOME": str(home),
            "CONVLENS_DATA_DIR": str(data),
            "CONVLENS_PORT": str(port),
            "CONVLENS_SHIPPED_MODELS": "false",
            "CONVLENS_EMBEDDED_WORKER": "false",
            "CONVLENS_ACCESS_LOG": "false",
            "CONVLENS_LOG_FORMAT": "text",
        }
        log = open(home / "server.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "service.server"], cwd=ROOT, env=env, stdout=log, stderr=log)
        rows = []
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: answers(url + "/health"), 120, lambda: f"the server:\n{(home / 'server.log').read_text()}")
            with httpx.Client(base_url=url, timeout=120) as c:
                t0 = time.perf_counter()
                while c.get("/topk", params={"layer": "layer3"}).status_code == 202:
                    time.sleep(0.2)
                build_s = time.perf_counter() - t0
                for name, (method, path, params) in http.items():

                    def call(method: str = method, path: str = path, params: dict[str, Any] = params) -> None:
                        files = {"file": ("x.png", png, "image/png")} if method == "POST" else None
                        r = c.request(method, path, params=params, files=files)
                        assert r.status_code == 200, (path, r.status_code, r.text[:200])

                    h = summary(timed(call, n))
                    b = base.get(name)
                    rows.append(
                        {
                            "arch": arch,
                            "endpoint": name,
                            "http_p50_ms": h["p50"],
                            "http_p95_ms": h["p95"],
                            "inproc_p50_ms": b["p50"] if b else None,
                            "ratio": h["p50"] / b["p50"] if b else None,
                        }
                    )
                rows.append({"arch": arch, "endpoint": "topk index build (validation split)", "build_s": build_s})
        finally:
            Server(url, proc, home / "server.log").stop(30)  # SIGTERM, then SIGKILL if it lingers: never an orphan
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "var" / "data"))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--arch", nargs="*", default=["resnet18", "resnet18-cifar"])
    ap.add_argument("--out")
    a = ap.parse_args()
    data = Path(a.data)
    test = load_cifar(data, "cifar10", train=False)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(test.images[0].permute(1, 2, 0).numpy())).save(buf, "PNG")
    threads = max(1, len(os.sched_getaffinity(0)) - 1)
    _ = dataset_info("cifar10")
    rows = []
    for arch in a.arch:
        rows += bench_arch(arch, buf.getvalue(), data, a.n, threads)
    print(f"\n{'arch':16} {'endpoint':40} {'HTTP p50':>9} {'p95':>8} {'in-proc':>8} {'ratio':>6}")
    for r in rows:
        if "build_s" in r:
            print(f"{r['arch']:16} {r['endpoint']:40} {r['build_s']:8.1f}s")
            continue
        ip = f"{r['inproc_p50_ms']:7.1f}" if r["inproc_p50_ms"] else "      -"
        ratio = f"{r['ratio']:5.2f}x" if r["ratio"] else "     -"
        print(f"{r['arch']:16} {r['endpoint']:40} {r['http_p50_ms']:7.1f}ms {r['http_p95_ms']:6.1f}ms {ip}ms {ratio}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
