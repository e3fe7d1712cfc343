"""POST /predict under load (wrk, real CIFAR-10 test PNGs) against the bare model and a naive endpoint, in one run.

    .venv/bin/python bench/serve_predict.py [--model-home var [--run ID] | --shipped] [--data var/data] [--duration 10]
        [--concurrency 1 8 32 64] [--api-processes 1 2] [--server-env CONVLENS_BATCH_MAX_WAIT_MS=2 ...]
        [--engine torch openvino openvino:bf16 openvino:int8] [--accuracy 10000] [--json-body] [--out r.json]

`--engine` runs the service once per engine (CONVLENS_PREDICT_ENGINE[:CONVLENS_PREDICT_PRECISION]; the first is
the baseline of the ratios) and `--accuracy N` measures top-1 on N test images through each one's /predict. With
`--json-body`, LitServe runs as a peer on the same weights and images (batch 32, 5 ms; the eager model, as its
docs serve one) and the ratios against it are printed; it is not a dependency: `.venv/bin/pip install
litserve==0.2.19`, else the peer is skipped.

Measures, in this order so they never overlap: (a) the bare model's batched in-process throughput (the ceiling),
the service (`uvicorn service.app:create_app`, micro-batched), and (b) a naive FastAPI endpoint doing one forward
per request in its handler, each server driven by the same wrk Lua script cycling over the same PNG bodies.
Prints throughput, p50/p95/p99, errors, CPU-ms a request (the server's and wrk's own, from rusage; the service's
event loop's, its main thread, from /proc), the service's mean micro-batch, and the ratios the issue asks for,
with the CPU bound they cannot pass on these cores.
The service runs with its defaults (torch threads = cores - 1, the engine's = cores, batch <= 64 images, no extra
wait) and
OMP_WAIT_POLICY=PASSIVE, as `service.server.serve` runs it; the ceiling and the naive endpoint use torch's
default threads (all cores).
Needs `wrk` (apt-get install -y wrk). Model: var's `seed-reproduction` when finished, else an untrained
checkpoint of the seed arch in a temp home (the speed is the same).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi import FastAPI, File, Request, UploadFile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.wrk_lua import SUMMARY  # noqa: E402
from models.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from models.data import dataset_info, load_cifar  # noqa: E402
from models.resnet import build_model  # noqa: E402
from models.runs import TERMINAL, RunStore  # noqa: E402
from service.images import ImageLimits, normalize_batch, prepare, prepare_uint8  # noqa: E402
from tests.helpers import SERVE, Server, descendants, free_port, png_bytes, start_server  # noqa: E402

BOUNDARY = "convlensbenchboundary7c1f"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

LUA = (
    r"""
local reqs, i = {}, 0
function init(args)
  local f = assert(io.open(os.getenv("BENCH_BODIES"), "rb"))
  local data = f:read("*a")
  f:close()
  local headers = {["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")}
  local pos = 1
  while pos <= #data do
    local nl = string.find(data, "\n", pos, true)
    local len = tonumber(string.sub(data, pos, nl - 1))
    reqs[#reqs + 1] = wrk.format("POST", nil, headers, string.sub(data, nl + 1, nl + len))
    pos = nl + len + 1
  end
  i = math.random(#reqs)
end
function request()
  i = i % #reqs + 1
  return reqs[i]
end
function done(summary, latency, requests)
"""
    + SUMMARY
    + """end
"""
)


# ---- the model ----------------------------------------------------------------------------------------------------


def model_home(arg: Path | None, tmp: Path, run: str | None = None) -> tuple[Path, str]:
    """(run store, model id): the one given (its run `run`, else its first finished one), var's finished seed run,
    or an untrained seed-arch checkpoint."""
    if arg is not None:
        store = RunStore(arg)
        runs = [r for r in store.list_runs() if r.get("status") in TERMINAL and (run is None or r["id"] == run)]
        ids = [r["id"] for r in runs if (store.checkpoints_dir(r["id"]) / "best.json").is_file()]
        if not ids:
            sys.exit(f"{arg} holds no finished run {run or ''} with a best checkpoint")
        return arg, ids[0]
    var = ROOT / "var"
    store = RunStore(var)
    seed = "seed-reproduction"
    finished = store.exists(seed) and store.read_run(seed).get("status") in TERMINAL
    if finished and (store.checkpoints_dir(seed) / "best.json").is_file():
        return var, seed
    home = tmp / "home"
    store = RunStore(home)
    store.create_run({"arch": "resnet18"}, run_id="bench-untrained", status="succeeded")
    info = dataset_info("cifar10")
    meta = {"arch": "resnet18", "dataset": "cifar10", "num_classes": 10, "classes": CLASSES, "mean": list(info.mean)}
    meta |= {"std": list(info.std), "input_size": 32, "epoch": 0, "metrics": {}, "created": time.time()}
    torch.manual_seed(0)
    save_checkpoint(build_model("resnet18", 10).eval(), store.checkpoints_dir("bench-untrained") / "best", meta)
    return home, "bench-untrained"


def shipped_home(tmp: Path) -> tuple[Path, str]:
    """A temp run store whose one finished run holds the shipped model's checkpoint (hard links)."""
    from models.shipped import SHIPPED_DIR, SHIPPED_ID

    store = RunStore(tmp / "home")
    store.create_run({"arch": "resnet18"}, run_id="shipped", status="succeeded")
    ckpt = store.checkpoints_dir("shipped")
    ckpt.mkdir(parents=True, exist_ok=True)
    for ext in (".json", ".safetensors"):
        os.link(SHIPPED_DIR / f"{SHIPPED_ID}{ext}", ckpt / f"best{ext}")
    return store.home, "shipped"


def test_pngs(data: Path, n: int) -> list[bytes]:
    """The first n CIFAR-10 test images as PNG files."""
    ds = load_cifar(data, "cifar10", train=False)
    return [png_bytes(ds.images[i].permute(1, 2, 0).numpy()) for i in range(n)]


def ceiling(stem: Path, pngs: list[bytes], seconds: float, threads: int | None = None) -> dict[int, float]:
    """Images/s of the bare model in this process, per batch size (tensors prepared beforehand).

    `threads` runs it on that many torch threads (then restores the setting): one thread does less work per
    image than two on these cores (no fork/join), which the CPU bound in `report` uses.
    """
    model, meta = load_checkpoint(stem)
    x = torch.cat([prepare(p, meta, ImageLimits()) for p in pngs])
    out: dict[int, float] = {}
    saved = torch.get_num_threads()
    torch.set_num_threads(threads or saved)
    try:
        with torch.inference_mode():
            for bs in (1, 8, 32, 64) if threads is None else (32, 64):
                model(x[:bs])
                images, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    start = images % (len(x) - bs)
                    model(x[start : start + bs])
                    images += bs
                out[bs] = images / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    return out


# ---- load generation ----------------------------------------------------------------------------------------------


def multipart(png: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n'
    return head.encode() + b"Content-Type: image/png\r\n\r\n" + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def write_bodies(path: Path, pngs: list[bytes], json_body: bool) -> str:
    """One file of `<length>\\n<body>` records for the Lua script; returns the Content-Type."""
    with path.open("wb") as f:
        for p in pngs:
            body = json.dumps({"images": [base64.b64encode(p).decode()]}).encode() if json_body else multipart(p)
            f.write(f"{len(body)}\n".encode() + body)
    return "application/json" if json_body else f"multipart/form-data; boundary={BOUNDARY}"


def wrk(url: str, conns: int, seconds: float, script: Path, env: dict[str, str]) -> dict[str, Any]:
    """One wrk run: throughput, latency percentiles (ms) and error counts."""
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # children waited for: only this wrk, below
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out = proc.stdout
    if proc.returncode:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or out}")
    match = re.search(r"^BENCH (.*)$", out, re.M)
    if not match:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    r = json.loads(match.group(1))
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return {
        "concurrency": conns,
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1e3,
        "p95_ms": r["p95_us"] / 1e3,
        "p99_ms": r["p99_us"] / 1e3,
        "errors": errors,
        "requests": r["requests"],
        "client_cpu_ms_per_req": client_cpu * 1000 / max(1, r["requests"]),
    }


def stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU time from a /proc stat file (a process's or one thread's); 0 if it has exited."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:  # a descendant or thread that exited meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU time of a process, all its threads, and with `tree` its live descendants (API processes)."""
    own = stat_cpu_seconds(Path(f"/proc/{pid}/stat"))
    return own + sum(cpu_seconds(k, tree=False) for k in descendants(pid)) if tree else own


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """User + system CPU time of one thread. The main thread (tid = pid) of a one-process service is its event
    loop: HTTP, decoding and the JSON answer, all under the GIL."""
    return stat_cpu_seconds(Path(f"/proc/{pid}/task/{tid}/stat"))


def batch_counters(server: Server) -> tuple[float, float]:
    """(images, forward passes) so far, from the service's /metrics."""
    text = httpx.get(server.url + "/metrics").text
    get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]  # noqa: E731
    return get("convlens_batch_size_sum"), get("convlens_batch_size_count")


def drive(server: Server, path: str, levels: list[int], seconds: float, script: Path, env: dict[str, str],
          service: bool, one_process: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Warm up, then one wrk run per concurrency level; `one_process`: also the event loop's CPU a request."""
    wrk(server.url + path, max(levels), min(3.0, seconds), script, env)
    rows = []
    for c in levels:
        before = batch_counters(server) if service else (0.0, 0.0)
        pid = server.proc.pid
        cpu0, loop0 = cpu_seconds(pid), thread_cpu_seconds(pid, pid)
        row = wrk(server.url + path, c, seconds, script, env)
        row["cpu_ms_per_req"] = (cpu_seconds(pid) - cpu0) * 1000 / max(1, row["requests"])
        if one_process:
            row["loop_cpu_ms_per_req"] = (thread_cpu_seconds(pid, pid) - loop0) * 1000 / max(1, row["requests"])
        if service:
            after = batch_counters(server)
            row["mean_batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
        rows.append(row)
        print(f"  c={c:<3d} {row['rps']:7.1f} req/s  p50 {row['p50_ms']:6.1f} ms  p95 {row['p95_ms']:6.1f} ms  "
              f"p99 {row['p99_ms']:6.1f} ms  errors {row['errors']}  cpu {row['cpu_ms_per_req']:.2f} ms/req "
              f"(wrk {row['client_cpu_ms_per_req']:.2f})"
              + (f" loop {row['loop_cpu_ms_per_req']:.2f}" if one_process else "")
              + (f"  mean batch {row['mean_batch']:.1f}" if service else ""), flush=True)  # fmt: skip
    return rows


def check_answers(server: Server, path: str, stem: Path, pngs: list[bytes]) -> int:
    """How many of 32 images the server classifies differently from the bare model (should be 0)."""
    model, meta = load_checkpoint(stem)
    wrong = 0
    for p in pngs[:32]:
        with torch.inference_mode():
            want = int(model(prepare(p, meta, ImageLimits())).argmax())
        got = httpx.post(server.url + path, files={"files": ("x.png", p, "image/png")}).json()
        wrong += int(got["predictions"][0]["top_k"][0]["index"] != want)
    return wrong


def top1(server: Server, path: str, data: Path, n: int) -> float:
    """Top-1 accuracy on the first n CIFAR-10 test images through the server's /predict (64 images a request)."""
    ds = load_cifar(data, "cifar10", train=False)
    n = min(n, len(ds))
    right = 0
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for start in range(0, n, 64):
            idx = range(start, min(n, start + 64))
            up = [("files", (f"{i}.png", png_bytes(ds.images[i].permute(1, 2, 0).numpy()), "image/png")) for i in idx]
            preds = client.post(path, files=up, params={"top_k": 1}).json()["predictions"]
            right += sum(int(p["top_k"][0]["index"] == int(ds.labels[i])) for p, i in zip(preds, idx, strict=True))
    return right / n


# ---- LitServe, a peer ---------------------------------------------------------------------------------------------


try:  # the LitServe peer's API must be importable by name: LitServe pickles it into its inference process
    from litserve import LitAPI as _LitAPI
except ImportError:
    _LitAPI = object


class LitClassifier(_LitAPI):  # type: ignore[misc, valid-type]
    """LitServe's /predict on the same weights: base64 JSON in, top-5 out (the eager model, batched)."""

    def __init__(self, stem: Path) -> None:
        super().__init__(max_batch_size=32, batch_timeout=0.005)
        self.stem = stem

    def setup(self, device: str) -> None:
        self.model, self.meta = load_checkpoint(self.stem)

    def decode_request(self, request: dict[str, Any]) -> torch.Tensor:
        return prepare_uint8(base64.b64decode(request["images"][0]), self.meta, ImageLimits())

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(self.model(normalize_batch(x, self.meta)), dim=1)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probs: torch.Tensor) -> dict[str, Any]:
        v, i = probs.topk(5)
        top = [{"name": CLASSES[j], "index": j, "probability": q} for q, j in zip(v.tolist(), i.tolist(), strict=True)]
        return {"predictions": [{"image": 0, "top_k": top}]}


# LitServe picks how to parse a body by comparing this annotation with starlette's Request (then: JSON); under
# `from __future__ import annotations` it would see the string "dict[str, Any]" and ask for a query parameter.
LitClassifier.decode_request.__annotations__["request"] = Request


def litserve_peer(stem: Path, port: int) -> None:
    """Serve LitClassifier on this port until stopped."""
    import litserve as ls

    server = ls.LitServer(LitClassifier(stem), accelerator="cpu")
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


def start_peer(stem: Path, log_dir: Path, env: dict[str, str]) -> Server:
    """Start the LitServe peer (this script with --peer-port) and wait for its /health."""
    port = free_port()
    log_path = log_dir / f"litserve-{port}.log"
    cmd = [sys.executable, __file__, "--peer-port", str(port), "--peer-stem", str(stem)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(server.url + "/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    stop_peer(server)
    raise RuntimeError(f"LitServe did not start:\n{server.log()[-3000:]}")


def stop_peer(server: Server) -> None:
    """Stop LitServe and the inference and API processes it started, by PID."""
    family = descendants(server.proc.pid)
    server.stop()
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---- the naive baseline -------------------------------------------------------------------------------------------


def one_at_a_time_app(meta: dict[str, Any], model: torch.nn.Module | None) -> Any:
    """/predict decoding each upload in the handler, then one forward each (none when `model` is None)."""
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(files: list[UploadFile] = File(...)) -> dict[str, Any]:
        preds = []
        for f in files:
            x = prepare(await f.read(), meta, ImageLimits())
            if model is None:
                preds.append([{"name": CLASSES[0], "index": 0, "probability": float(x.shape[0])}])
                continue
            with torch.inference_mode():
                probs = torch.softmax(model(x), dim=1)[0]
            v, i = probs.topk(5)
            preds.append(
                [
                    {"name": CLASSES[j], "index": j, "probability": q}
                    for q, j in zip(v.tolist(), i.tolist(), strict=True)
                ]
            )
        return {"predictions": preds}

    return app


def naive_app() -> Any:
    """The usual first FastAPI endpoint: decode and run one forward per request in the handler."""
    model, meta = load_checkpoint(Path(os.environ["BENCH_MODEL_STEM"]))
    if os.environ.get("BENCH_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_TORCH_THREADS"]))
    return one_at_a_time_app(meta, model)


def floor_app() -> Any:
    """The HTTP floor: the same upload, decode and eval transform as /predict, and no model at all.

    Its CPU cost per request plus the model's share (cores / ceiling per image) bounds what any server on
    these cores can do.
    """
    return one_at_a_time_app({"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "input_size": 32}, None)


# ---- main -----------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-home", type=Path, help="a run store with a finished run (default: see above)")
    ap.add_argument("--run", help="with --model-home: the run to serve (e.g. a trained 32px seed-stem row)")
    ap.add_argument("--shipped", action="store_true", help="bench the shipped model (models/weights)")
    ap.add_argument("--data", type=Path, default=ROOT / "var" / "data", help="holds cifar-10-batches-py")
    ap.add_argument("--images", type=int, default=1000, help="distinct test images to cycle through")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--server-env", nargs="*", default=[], metavar="K=V", help="CONVLENS_* settings for the service")
    ap.add_argument(
        "--engine", nargs="+", default=["torch", "openvino"], metavar="ENGINE[:PRECISION]",
        help="the service once per engine, e.g. torch openvino openvino:int8 (the first is the baseline)",
    )  # fmt: skip
    ap.add_argument("--gate-images", type=int, default=1000, help="validation images of the engine's gate")
    ap.add_argument("--accuracy", type=int, default=0, metavar="N", help="top-1 on N test images through /predict")
    ap.add_argument("--json-body", action="store_true", help="send base64 JSON instead of multipart (and run LitServe)")
    ap.add_argument("--torch-threads", type=int, help="torch threads everywhere (default: torch's own, the cores)")
    ap.add_argument(
        "--api-processes", type=int, nargs="+", default=[1], metavar="N", help="also as N API processes, e.g. 1 2"
    )
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-floor", action="store_true", help="skip the no-model HTTP floor")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--peer-port", type=int, help=argparse.SUPPRESS)  # this script as the LitServe peer
    ap.add_argument("--peer-stem", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args()


def engine_env(spec: str) -> dict[str, str]:
    """`openvino:bf16` -> the service's CONVLENS_PREDICT_* variables."""
    name, _, precision = spec.partition(":")
    return {"CONVLENS_PREDICT_ENGINE": name, **({"CONVLENS_PREDICT_PRECISION": precision} if precision else {})}


def run_services(args: argparse.Namespace, home: Path, model_id: str, tmp: Path, script: Path, env: dict[str, str],
                 server_env: dict[str, str], results: dict[str, Any]) -> None:  # fmt: skip
    """The service once per engine (results["engines"]), the first also as N API processes, and LitServe."""
    stem = RunStore(home).checkpoints_dir(model_id) / "best"
    path = f"/predict?model={model_id}"
    results["engines"], results["accuracy"], results["engine_info"], results["processes"] = {}, {}, {}, {}
    for spec in args.engine:
        e_env = {**server_env, **engine_env(spec), "CONVLENS_DATA_DIR": str(args.data)}
        e_env["CONVLENS_DEFAULT_MODEL"] = model_id  # loaded (and its engine built) before the server answers
        e_env["CONVLENS_PREDICT_GATE_IMAGES"] = str(args.gate_images)
        print(f"service (micro-batched), engine {spec} {server_env or ''}")
        with start_server(home, log_dir=tmp, env=e_env, torch_threads=None, timeout=600) as srv:
            info = httpx.get(f"{srv.url}/models/{model_id}").json()["predict_engine"]
            results["engine_info"][spec] = info
            print(f"  serves with {info['engine']} {info['precision'] or ''}; gate {json.dumps(info['gate'])}"
                  + (f"; fallback: {info['fallback_reason']}" if info["fallback_reason"] else ""))  # fmt: skip
            results["wrong_answers"] = results.get("wrong_answers", 0) + check_answers(srv, path, stem, results["pngs"])
            results["engines"][spec] = drive(
                srv, path, args.concurrency, args.duration, script, env, service=True, one_process=True
            )
            if args.accuracy:
                results["accuracy"][spec] = top1(srv, path, args.data, args.accuracy)
                print(f"  top-1 on {args.accuracy} test images through /predict: {results['accuracy'][spec]:.2%}")
    results["service"] = results["engines"][args.engine[-1]]
    for n in (n for n in args.api_processes if n > 1):
        print(f"service, {n} API processes (convlens serve, CONVLENS_API_PROCESSES={n}), engine {args.engine[-1]}")
        prom = tmp / f"prometheus-{n}"
        prom.mkdir()
        n_env = {**server_env, **engine_env(args.engine[-1]), "CONVLENS_API_PROCESSES": str(n)}
        n_env |= {"CONVLENS_EMBEDDED_WORKER": "false", "PROMETHEUS_MULTIPROC_DIR": str(prom)}  # /metrics sums all
        with start_server(home, log_dir=tmp, env=n_env, app=SERVE, torch_threads=None, timeout=600) as srv:
            results["wrong_answers"] += check_answers(srv, path, stem, results["pngs"])
            results["processes"][n] = drive(srv, path, args.concurrency, args.duration, script, env, service=True)
    run_litserve(args, stem, tmp, script, env, server_env, results)


def run_litserve(args: argparse.Namespace, stem: Path, tmp: Path, script: Path, env: dict[str, str],
                 server_env: dict[str, str], results: dict[str, Any]) -> None:  # fmt: skip
    """LitServe as a peer on the same weights and bodies, when installed and the bodies are JSON."""
    try:
        import litserve  # noqa: F401
    except ImportError:
        print("LitServe peer skipped: not installed (.venv/bin/pip install litserve==0.2.19)")
        return
    if not args.json_body:
        print("LitServe peer skipped: it reads base64 JSON; run with --json-body")
        return
    print("LitServe peer (batch 32, 5 ms, eager torch)")
    peer_env = {"OMP_WAIT_POLICY": server_env["OMP_WAIT_POLICY"], "PYTHONPATH": str(ROOT)}
    peer = start_peer(stem, tmp, peer_env)
    try:
        probe = {"images": [base64.b64encode(results["pngs"][0]).decode()]}
        answer = httpx.post(peer.url + "/predict", json=probe, timeout=30)
        if answer.status_code != 200:  # the bench would only count errors: say what is wrong instead
            raise RuntimeError(f"LitServe answered {answer.status_code}: {answer.text[:500]}")
        results["litserve"] = drive(peer, "/predict", args.concurrency, args.duration, script, env, service=False)
    finally:
        stop_peer(peer)


def main() -> None:
    args = parse_args()
    if args.peer_port:
        litserve_peer(args.peer_stem, args.peer_port)
        return
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install -y wrk")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        home, model_id = shipped_home(tmp) if args.shipped else model_home(args.model_home, tmp, args.run)
        stem = RunStore(home).checkpoints_dir(model_id) / "best"
        pngs = test_pngs(args.data, args.images)
        print(f"model {model_id} in {home}; {len(pngs)} CIFAR-10 test PNGs; torch threads {torch.get_num_threads()}")
        busy = subprocess.run(["pgrep", "-f", "convlens train"], capture_output=True).stdout.strip()
        if busy or os.getloadavg()[0] > 1.0:
            print(f"WARNING: load average {os.getloadavg()[0]:.1f}: the numbers share the CPU with other work")

        ceil = ceiling(stem, pngs, min(3.0, args.duration))
        print("bare model, batched in-process: " + ", ".join(f"batch {b}: {v:.0f} img/s" for b, v in ceil.items()))
        one = ceiling(stem, pngs, min(3.0, args.duration), threads=1)
        print("  on one torch thread: " + ", ".join(f"batch {b}: {v:.0f} img/s" for b, v in one.items()))
        bodies, script = tmp / "bodies.bin", tmp / "cycle.lua"
        script.write_text(LUA)
        env = {"BENCH_BODIES": str(bodies), "BENCH_CONTENT_TYPE": write_bodies(bodies, pngs, args.json_body)}
        server_env = dict(kv.split("=", 1) for kv in args.server_env)
        server_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as service.server.serve sets it
        if args.torch_threads:
            server_env.setdefault("CONVLENS_TORCH_THREADS", str(args.torch_threads))
        results: dict[str, Any] = {"model": model_id, "ceiling_img_s": ceil, "one_thread_img_s": one}
        results["server_env"], results["pngs"] = server_env, pngs
        run_services(args, home, model_id, tmp, script, env, server_env, results)
        del results["pngs"]
        if not args.skip_naive and not args.json_body:
            print("naive endpoint (one forward per request)")
            naive_env = {"BENCH_MODEL_STEM": str(stem), "BENCH_TORCH_THREADS": str(args.torch_threads or "")}
            with start_server(home, log_dir=tmp, env=naive_env, app="bench.serve_predict:naive_app",
                              torch_threads=None) as naive:  # fmt: skip
                results["naive"] = drive(naive, "/predict", args.concurrency, args.duration, script, env, False)
        if not args.skip_floor and not args.json_body:
            top = [max(args.concurrency)]
            print("HTTP floor (upload + decode + transform, no model)")
            with start_server(home, log_dir=tmp, app="bench.serve_predict:floor_app", torch_threads=1) as floor:
                results["floor"] = drive(floor, "/predict", top, args.duration, script, env, False)
        report(results)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(results: dict[str, Any]) -> None:
    """The ratios the issue's targets are stated in."""
    svc = {r["concurrency"]: r for r in results["service"]}
    best_ceiling = max(results["ceiling_img_s"].values())
    top = max(svc)
    print(f"\nanswers differing from the bare model: {results['wrong_answers']} of 32")
    print(f"service @ c={top}: {svc[top]['rps']:.0f} req/s = {svc[top]['rps'] / best_ceiling:.0%} of the ceiling "
          f"({best_ceiling:.0f} img/s)")  # fmt: skip
    if "naive" in results:
        naive = {r["concurrency"]: r for r in results["naive"]}
        ratio = svc[top]["rps"] / max(naive[top]["rps"], 1e-9)
        print(f"service / naive @ c={top}: {ratio:.1f}x ({naive[top]['rps']:.0f} req/s)")
    if "floor" in results:
        # CPU arithmetic: each request costs the floor's CPU (HTTP, multipart, decode, transform, JSON), the load
        # generator's (wrk runs on the same cores) and the model's share at its most frugal (one torch thread or
        # all, whichever spends fewer CPU-ms an image). The cores bound their sum, whatever the server's design.
        floor, cores = results["floor"][0], os.cpu_count() or 1
        model_ms = min(cores * 1000 / best_ceiling, 1000 / max(results["one_thread_img_s"].values()))
        per_req = floor["cpu_ms_per_req"] + floor["client_cpu_ms_per_req"] + model_ms
        bound = cores * 1000 / per_req
        s_top = svc[top]
        print(
            f"HTTP floor @ c={top} (no model): {floor['rps']:.0f} req/s, {floor['cpu_ms_per_req']:.2f} CPU-ms a "
            f"request (+ wrk {floor['client_cpu_ms_per_req']:.2f}); the model at best {model_ms:.2f} CPU-ms an "
            f"image; so at most {bound:.0f} req/s on {cores} cores = {bound / best_ceiling:.0%} of the ceiling"
        )
        busy = (s_top["cpu_ms_per_req"] + s_top["client_cpu_ms_per_req"]) * s_top["rps"] / 1000
        print(f"service @ c={top}: {s_top['cpu_ms_per_req']:.2f} CPU-ms a request + wrk "
              f"{s_top['client_cpu_ms_per_req']:.2f}: {busy:.2f} of {cores} cores busy")  # fmt: skip
    for n, rows in results.get("processes", {}).items():
        by_c = {r["concurrency"]: r for r in rows}
        p99 = f"; p99 @ c=32: {by_c[32]['p99_ms']:.1f} ms" if 32 in by_c else ""
        print(f"{n} API processes @ c={top}: {by_c[top]['rps']:.0f} req/s = {by_c[top]['rps'] / best_ceiling:.0%} "
              f"of the ceiling, {by_c[top]['rps'] / svc[top]['rps']:.2f}x one process{p99}")  # fmt: skip
    if 32 in svc:
        print(f"p99 @ c=32: {svc[32]['p99_ms']:.1f} ms")
    if 1 in svc:
        print(f"p50 @ c=1: {svc[1]['p50_ms']:.1f} ms")
    report_peers(results)
    others = [(name, key) for name, key in (("naive", "naive"), ("LitServe", "litserve")) if key in results]
    print(f"errors: service {sum(r['errors'] for r in results['service'])}"
          + "".join(f", {name} {sum(r['errors'] for r in results[key])}" for name, key in others))  # fmt: skip


def row_text(r: dict[str, Any]) -> str:
    """One wrk run in a few figures (CPU-ms a request: the server's, all its processes)."""
    loop = f" (event loop {r['loop_cpu_ms_per_req']:.2f})" if "loop_cpu_ms_per_req" in r else ""
    latency = f"p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.0f} ms"
    return f"{r['rps']:.0f} req/s {latency} {r['cpu_ms_per_req']:.2f} CPU-ms/req{loop}"


def report_peers(results: dict[str, Any]) -> None:
    """Each engine against the first (the baseline) and against LitServe, per concurrency, from this one run."""
    engines = {spec: {r["concurrency"]: r for r in rows} for spec, rows in results.get("engines", {}).items()}
    peer = {r["concurrency"]: r for r in results.get("litserve", [])}
    base = next(iter(engines), "")
    for spec, rows in engines.items():
        print(f"engine {spec}:")
        for c, r in rows.items():
            part = f"  c={c}: {row_text(r)}"
            if spec != base:
                part += f" = {r['rps'] / engines[base][c]['rps']:.2f}x {base}"
            if c in peer:  # CPU a request as well: on shared cores it moves less than req/s with others' load
                less = peer[c]["cpu_ms_per_req"] / r["cpu_ms_per_req"]
                part += f", {r['rps'] / peer[c]['rps']:.2f}x LitServe (CPU a request {less:.2f}x less)"
            print(part)
        acc = results.get("accuracy", {}).get(spec)
        if acc is not None:
            print(f"  top-1 through /predict: {acc:.2%}")
    for c, r in peer.items():
        print(f"LitServe c={c}: {row_text(r)}")


if __name__ == "__main__":
    main()
