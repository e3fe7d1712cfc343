"""The /predict engine: the eager model compiled by OpenVINO for the CPU, checked against torch before it serves.

`CONVLENS_PREDICT_ENGINE=auto|torch|openvino` and `CONVLENS_PREDICT_PRECISION=auto|f32|bf16|int8`. `auto` serves
with OpenVINO on the CPU (torch on CUDA, or when OpenVINO is missing), in bf16 where the CPU has bf16 instructions
and the bf16 gate passes, else in f32. int8 is the OpenVINO model quantized after training by NNCF, calibrated on
images of the model's training split; where its gate refuses, f32 serves. Only /predict uses the engine: the
look-inside endpoints keep the eager model, whose hooks and reverse network they need.

The gate, at export: on a fixed probe batch the engine's logits against eager torch's (f32: max abs diff at most
1e-4), then top-1 on the model's validation split (f32: agreement with torch at least 99.9%; bf16: the accuracy
change at most 0.2 points, which needs the labelled split; int8 the same). Without the dataset, f32 checks agreement
on a fixed synthetic set (models.synthetic) and bf16 and int8 are refused. A failed gate or export serves with torch
(int8: with f32), with the reason logged and shown on /models/{id}. Exports and their gate results are cached under
`<home>/engines/`, keyed by the weights' sha256, engine (and its version), precision and input size.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from models.checkpoints import atomic_write_json, sha256_file, weights_path
from models.data import ArrayDataset, load_cifar, train_val_split
from models.device import cpu_bf16_flags
from models.errors import ConvLensError
from models.synthetic import synthetic_images
from service.images import normalize_batch
from service.settings import Settings

log = logging.getLogger("convlens.engine")

EngineName = Literal["auto", "torch", "openvino"]
Precision = Literal["auto", "f32", "bf16", "int8"]

F32_MAX_ABS_DIFF = 1e-4
F32_MIN_AGREEMENT = 0.999
LOW_PRECISION_MAX_ACCURACY_CHANGE = 0.002  # 0.2 points, for bf16 and int8
# The ranges int8 quantizes to are measured on these; NNCF's default, 300, cost the shipped model the gate's limit.
CALIBRATION_IMAGES = 1000
PROBE_BATCH = 32
SYNTHETIC_GATE_IMAGES = 512
GATE_CHUNK = 64
SHA256_RE = re.compile(r"[0-9a-f]{64}")

# What /models/{id} says of a model whose /predict runs on eager torch (copied, never changed).
TORCH_INFO: dict[str, Any] = {"engine": "torch", "precision": "f32", "gate": None, "fallback_reason": None}

# Logits from float32 network inputs (N, 3, H, W); the batcher applies the softmax.
Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EngineConfig:
    """What the registry needs to build each model's predict engine."""

    engine: EngineName = "auto"
    precision: Precision = "auto"
    threads: int | None = None  # None: torch's intra-op threads; a server's come from engine_config
    cache_dir: Path | None = None
    data_root: Path | None = None
    gate_images: int = 10_000
    package: str = "openvino"  # the module imported; tests name a missing one to see the fallback


class EngineRefused(Exception):
    """An export that failed or did not pass the gate; the message is the logged reason."""


class OpenVinoForward:
    """One compiled OpenVINO model and its one infer request (one copy per process, used under a lock)."""

    def __init__(self, compiled: Any, precision: str) -> None:
        self.precision = precision
        self.threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))  # as compiled, not as asked
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes) float32 for float32 inputs; the outputs are copied out of the request."""
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:
            out = self._request.infer({0: arr}, share_inputs=True, share_outputs=False)
        return torch.from_numpy(np.asarray(out[0]))


# ---- export --------------------------------------------------------------------------------------------------------


@functools.cache
def _core(ov: Any) -> Any:
    """One OpenVINO Core per process: it holds the CPU plugin and its thread pool."""
    return ov.Core()


def convert_openvino(ov: Any, model: torch.nn.Module, size: int) -> Any:
    """The eager model traced into an OpenVINO model with a dynamic batch dimension."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # OpenVINO traces with torch.jit, which warns it is old
        converted = ov.convert_model(model.eval(), example_input=torch.zeros(1, 3, size, size))
    converted.reshape([-1, 3, size, size])
    return converted


def compile_openvino(ov: Any, converted: Any, precision: str, threads: int) -> OpenVinoForward:
    """Compile for the CPU: `threads` intra-op threads, one stream, no pinning (TBB workers sleep when idle)."""
    config = {
        # The CPU plugin picks bf16 by itself where it can; int8 layers stay int8 whatever the hint says.
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,  # the event loop and the other processes share these cores
    }
    return OpenVinoForward(_core(ov).compile_model(converted, "CPU", config), precision)


def engine_threads(processes: int = 1) -> int:
    """The engine's default threads: every core, shared out among the API processes. Unlike eager torch's (the
    cores less the event loop's), the event loop's core is included: OpenVINO's workers sleep when idle instead
    of spinning, so the second thread takes only the time the event loop leaves idle (bench/serve_predict.py)."""
    return max(1, len(os.sched_getaffinity(0)) // processes)


def engine_config(settings: Settings) -> EngineConfig:
    """The engine settings of a server: its CONVLENS_PREDICT_* fields, the run store's cache and the dataset."""
    return EngineConfig(
        engine=settings.predict_engine,
        precision=settings.predict_precision,
        threads=settings.predict_threads or settings.torch_threads or engine_threads(settings.api_processes),
        cache_dir=settings.home / "engines",
        data_root=settings.data_root,
        gate_images=settings.predict_gate_images,
    )


# ---- the gate ------------------------------------------------------------------------------------------------------


def probe_batch(size: int) -> torch.Tensor:
    """A fixed batch of normalised-looking inputs, the same on every machine."""
    return torch.randn(PROBE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))


def _val_size(meta: dict[str, Any]) -> int:
    """The validation images the model's run held out of its training file (0: none)."""
    return int((meta.get("config") or {}).get("val_size") or 0)


@functools.lru_cache(maxsize=1)
def _training_file(root: Path, dataset: str) -> ArrayDataset:
    """The dataset's training file, read once for both calibration and the gate (build_engine clears this)."""
    return load_cifar(root, dataset, train=True)


def model_splits(meta: dict[str, Any], data_root: Path | None) -> tuple[ArrayDataset, ArrayDataset | None]:
    """(training, validation) splits of the model's dataset as its run cut them; EngineRefused says what is
    missing."""
    dataset = str(meta.get("dataset") or "cifar10")
    if data_root is None or dataset not in ("cifar10", "cifar100"):
        raise EngineRefused("no dataset is configured")
    try:
        return train_val_split(_training_file(Path(data_root), dataset), _val_size(meta))
    except (ConvLensError, OSError, ValueError) as e:
        raise EngineRefused(str(e)) from e


def gate_images(meta: dict[str, Any], data_root: Path | None, limit: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(uint8 images, labels, source): the model's validation split when on disk, else a fixed synthetic set."""
    if _val_size(meta) > 0:
        try:
            _, val = model_splits(meta, data_root)
        except EngineRefused as e:
            log.info("engine gate: no validation split (%s); a synthetic set instead", e)
        else:
            if val is not None and len(val) > 0:
                n = min(limit, len(val))
                return val.images[:n], val.labels[:n], "validation"
    imgs, labels = synthetic_images(SYNTHETIC_GATE_IMAGES, int(meta["num_classes"]), np.random.default_rng(0))
    return torch.from_numpy(imgs.reshape(-1, 3, 32, 32)), torch.tensor(labels), "synthetic"


def calibration_inputs(meta: dict[str, Any], data_root: Path | None) -> list[np.ndarray]:
    """Network inputs for int8 calibration: the first CALIBRATION_IMAGES of the model's training split (never the
    validation images the gate judges by), through the service's own transform, in GATE_CHUNK batches."""
    if _val_size(meta) <= 0:  # refused before quantizing, which would be wasted: the gate would refuse it
        raise EngineRefused("int8 needs the validation split to measure its accuracy change; this model has none")
    try:
        train, _ = model_splits(meta, data_root)
    except EngineRefused as e:
        raise EngineRefused(f"int8: calibration needs the model's training images ({e})") from e
    images = train.images[:CALIBRATION_IMAGES]
    return [normalize_batch(c, meta).numpy() for c in images.split(GATE_CHUNK)]


def quantize_openvino(converted: Any, meta: dict[str, Any], data_root: Path | None) -> Any:
    """The OpenVINO model quantized to int8 (weights and activations) by NNCF's post-training quantization."""
    inputs = calibration_inputs(meta, data_root)
    try:
        nncf = importlib.import_module("nncf")
    except ImportError as e:
        raise EngineRefused(f"int8: nncf is not installed ({e}); `pip install nncf`") from e
    nncf.set_log_level(logging.ERROR)  # below that it draws progress bars on the server's stdout
    return nncf.quantize(converted, nncf.Dataset(inputs), subset_size=len(inputs))  # the size counts batches


def _top1(forward: Forward, images: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Predicted classes of uint8 images, fed in bounded chunks through the service's own transform."""
    with torch.inference_mode():
        return torch.cat([forward(normalize_batch(c, meta)).argmax(1) for c in images.split(GATE_CHUNK)])


def run_gate(
    reference: torch.nn.Module, engine: Forward, meta: dict[str, Any], precision: str, cfg: EngineConfig
) -> dict[str, Any]:
    """Compare the engine with eager torch; the result says what was measured and whether it passes."""
    size = int(meta.get("input_size", 32))
    x = probe_batch(size)
    with torch.inference_mode():
        diff = float((reference(x) - engine(x)).abs().max())
    images, labels, source = gate_images(meta, cfg.data_root, cfg.gate_images)
    want, got = _top1(reference, images, meta), _top1(engine, images, meta)
    agreement = float((want == got).float().mean())
    result: dict[str, Any] = {"probe_max_abs_diff": diff, "images": len(labels), "data": source}
    result["top1_agreement"] = agreement
    if source == "validation":
        result["torch_accuracy"] = float((want == labels).float().mean())
        result["accuracy"] = float((got == labels).float().mean())
        result["accuracy_change_points"] = round((result["accuracy"] - result["torch_accuracy"]) * 100, 3)
    result["reason"] = _refusal(result, precision)
    result["passed"] = result["reason"] is None
    return result


def _refusal(r: dict[str, Any], precision: str) -> str | None:
    """Why the gate refuses these measurements (None: it passes)."""
    if precision in ("bf16", "int8"):
        if "accuracy_change_points" not in r:
            return f"{precision} needs the validation split to measure its accuracy change, and it is not on disk"
        if abs(r["accuracy_change_points"]) > LOW_PRECISION_MAX_ACCURACY_CHANGE * 100:
            return f"{precision} changes validation accuracy by {r['accuracy_change_points']:+.2f} points (limit 0.2)"
        return None
    if not r["probe_max_abs_diff"] <= F32_MAX_ABS_DIFF:  # `not <=` also refuses NaN
        return f"logits differ from torch by {r['probe_max_abs_diff']:.2e} on the probe batch (limit 1e-4)"
    if r["top1_agreement"] < F32_MIN_AGREEMENT:
        return f"top-1 agrees with torch on {r['top1_agreement']:.2%} of {r['data']} images (limit 99.9%)"
    return None


# ---- the cache -----------------------------------------------------------------------------------------------------


def weights_sha256(stem: Path, meta: dict[str, Any]) -> str:
    """The weights' recorded sha256 (checked at load), else hashed from the file; it names a cache folder."""
    sha = meta.get("sha256")
    return sha if isinstance(sha, str) and SHA256_RE.fullmatch(sha) else sha256_file(weights_path(stem))


def cache_key(sha256: str, engine: str, version: str, precision: str, size: int) -> str:
    """One folder name per weights, engine version, precision and input size."""
    safe_version = re.sub(r"[^0-9A-Za-z.]+", "_", version)[:40]
    return f"{sha256}-{engine}{safe_version}-{precision}-{size}px"


def _fsync_tree(folder: Path) -> None:
    """fsync every file of a folder, so its rename commits complete files."""
    for p in folder.iterdir():
        with p.open("rb") as f:
            os.fsync(f.fileno())


def save_export(folder: Path, ov: Any, converted: Any | None, gate: dict[str, Any]) -> None:
    """Write the export (when it passed) and its gate result into a temp folder, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        if converted is not None:
            ov.save_model(converted, str(tmp / "model.xml"), compress_to_fp16=False)  # keep f32 weights exact
        atomic_write_json(tmp / "gate.json", gate)
        _fsync_tree(tmp)
        os.rename(tmp, folder)  # the commit: readers see a complete folder or none
    except OSError as e:
        if not folder.is_dir():  # another process committed the same export first: that one serves
            log.warning("could not cache the engine export in %s: %s", folder, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_export(folder: Path, ov: Any) -> tuple[Any | None, dict[str, Any]] | None:
    """(converted model or None when it was refused, gate result) from the cache; None on a miss."""
    try:
        gate = json.loads((folder / "gate.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(gate, dict) or not gate.get("passed"):
        return (None, gate) if isinstance(gate, dict) else None
    return _core(ov).read_model(str(folder / "model.xml")), gate


# ---- building one model's engine -----------------------------------------------------------------------------------


def _precisions(cfg: EngineConfig) -> list[str]:
    """The precisions to try, in order: auto tries bf16 first where the CPU has bf16 instructions; int8 falls back
    to f32, which needs no calibration and answers as torch does."""
    if cfg.precision == "int8":
        return ["int8", "f32"]
    if cfg.precision != "auto":
        return [cfg.precision]
    return ["bf16", "f32"] if cpu_bf16_flags() else ["f32"]


def _try_openvino(
    ov: Any, model: torch.nn.Module, meta: dict[str, Any], key_base: tuple[str, int], precision: str,
    cfg: EngineConfig,
) -> tuple[OpenVinoForward, dict[str, Any]]:  # fmt: skip
    """Export (or read from the cache), compile and gate one precision; EngineRefused says why not."""
    sha, size = key_base
    folder = cfg.cache_dir / cache_key(sha, "openvino", ov.__version__, precision, size) if cfg.cache_dir else None
    cached = load_export(folder, ov) if folder else None
    if cached is not None and cached[0] is None:
        raise EngineRefused(f"{precision}: {cached[1].get('reason')} (cached gate result)")
    if cached:
        converted = cached[0]
    else:
        converted = convert_openvino(ov, model, size)
        if precision == "int8":
            converted = quantize_openvino(converted, meta, cfg.data_root)
    forward = compile_openvino(ov, converted, precision, cfg.threads or torch.get_num_threads())
    if cached is not None:
        # A cached export still meets the probe on every load, so a corrupt or stale file never serves.
        x = probe_batch(size)
        with torch.inference_mode():
            diff = float((model(x) - forward(x)).abs().max())
        limit = F32_MAX_ABS_DIFF if precision == "f32" else max(1e-2, 2 * cached[1]["probe_max_abs_diff"])
        if not diff <= limit:
            raise EngineRefused(f"{precision}: the cached export in {folder} differs from torch by {diff:.2e}")
        return forward, {**cached[1], "cached": True}
    gate = run_gate(model, forward, meta, precision, cfg)
    if folder is not None and (gate["passed"] or gate["data"] == "validation" or precision == "f32"):
        # A bf16 or int8 refusal for want of the dataset is not cached: it may be measured once the data is there.
        save_export(folder, ov, converted if gate["passed"] else None, gate)
    if not gate["passed"]:
        raise EngineRefused(f"{precision}: {gate['reason']}")
    return forward, {**gate, "cached": False}


def build_engine(
    model: torch.nn.Module, meta: dict[str, Any], stem: Path, device: torch.device, cfg: EngineConfig
) -> tuple[Forward | None, dict[str, Any]]:
    """The model's /predict forward (None: eager torch) and its description for /models/{id}."""
    if device.type != "cpu":
        return None, {**TORCH_INFO, "precision": None, "fallback_reason": f"{device.type} serves with torch"}
    if cfg.engine == "torch":
        return None, dict(TORCH_INFO)
    try:
        ov = importlib.import_module(cfg.package)
    except ImportError as e:
        reason = f"{cfg.package} is not installed ({e}); `pip install openvino` for the faster CPU engine"
        log.warning("model %s serves /predict with torch: %s", stem.name, reason)
        return None, {**TORCH_INFO, "fallback_reason": reason}
    try:
        return _first_openvino(ov, model, meta, stem, cfg)
    finally:
        _training_file.cache_clear()  # read for calibration and the gate; the server keeps no copy of the dataset


def _first_openvino(
    ov: Any, model: torch.nn.Module, meta: dict[str, Any], stem: Path, cfg: EngineConfig
) -> tuple[Forward | None, dict[str, Any]]:
    """The first precision whose export passes its gate, else torch with every precision's reason."""
    key_base = (weights_sha256(stem, meta), int(meta.get("input_size", 32)))
    reasons = []
    for precision in _precisions(cfg):
        try:
            forward, gate = _try_openvino(ov, model, meta, key_base, precision, cfg)
        except EngineRefused as e:
            reasons.append(str(e))
        except Exception as e:  # an unsupported op, a corrupt cache file, a compiler error: torch serves instead
            reasons.append(f"{precision}: export failed: {type(e).__name__}: {e}")
        else:
            log.info("model %s serves /predict with OpenVINO %s (%s)", stem.name, precision, _summary(gate))
            info = {"engine": "openvino", "precision": precision, "version": ov.__version__, "gate": gate}
            info["threads"] = forward.threads
            return forward, {**info, "fallback_reason": "; ".join(reasons) or None}
    reason = "; ".join(reasons)
    log.warning("model %s serves /predict with torch: %s", stem.name, reason)
    return None, {**TORCH_INFO, "fallback_reason": reason}


def _summary(gate: dict[str, Any]) -> str:
    """The gate's figures in one log phrase."""
    parts = [f"probe max diff {gate['probe_max_abs_diff']:.1e}", f"top-1 agreement {gate['top1_agreement']:.2%}"]
    if "accuracy_change_points" in gate:
        parts.append(f"accuracy change {gate['accuracy_change_points']:+.2f} points")
    return ", ".join(parts) + f" on {gate['images']} {gate['data']} images"
