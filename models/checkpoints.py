"""Checkpoints: safetensors weights + JSON metadata, resume state, every write atomic."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.errors import CheckpointError, ConvLensError
from models.resnet import ResNet18, build_model

WEIGHTS = ".safetensors"
META = ".json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (indented, so people can read run.json and checkpoint metadata)."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def _atomic_via_temp(path: Path, write: Any) -> None:
    """Let `write(tmp_path)` produce the file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Library versions recorded beside every checkpoint."""
    import safetensors

    return {"torch": torch.__version__, "safetensors": safetensors.__version__, "python": platform.python_version()}


def weights_path(stem: Path) -> Path:
    """`.../best` or `.../best.json` or `.../best.safetensors` -> `.../best.safetensors`."""
    return stem.with_suffix(WEIGHTS) if stem.suffix in (WEIGHTS, META) else Path(f"{stem}{WEIGHTS}")


def meta_path(stem: Path) -> Path:
    """The metadata JSON beside a checkpoint's weights."""
    return weights_path(stem).with_suffix(META)


def save_checkpoint(model: torch.nn.Module, stem: Path, meta: dict[str, Any], half: bool = False) -> dict[str, Any]:
    """Save weights (safetensors) then metadata (JSON with the weights' sha256); returns the metadata."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    wpath = weights_path(stem)
    _atomic_via_temp(wpath, lambda tmp: save_file(state, tmp, metadata={"arch": str(meta.get("arch", ""))}))
    full = {**meta, "sha256": sha256_file(wpath), "weights": wpath.name, "versions": versions()}
    atomic_write_json(meta_path(stem), full)
    return full


def read_meta(stem: Path) -> dict[str, Any]:
    """A checkpoint's metadata, or a CheckpointError saying what is wrong with it."""
    mpath = meta_path(stem)
    try:
        meta = json.loads(mpath.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint metadata {mpath} is missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata {mpath} is corrupted: {e}") from e
    if not isinstance(meta, dict) or "arch" not in meta or "num_classes" not in meta:
        raise CheckpointError(f"checkpoint metadata {mpath} lacks 'arch' or 'num_classes'")
    return meta


def load_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, turning key or shape mismatches into one readable CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        if missing:
            parts.append(f"missing keys {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}")
        raise CheckpointError(f"{source} does not fit this architecture: " + ", ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load_weights(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, verifying its sha256 when given; corruption is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights {path} are missing")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"checkpoint weights {path} are corrupted or were replaced: sha256 {actual[:12]}... "
                f"does not match the recorded {expected_sha256[:12]}..."
            )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint weights {path} are truncated or corrupted: {e}") from e


def load_checkpoint(
    stem: Path, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[ResNet18, dict[str, Any]]:
    """Build the recorded architecture and load its weights (eval mode, float32)."""
    meta = read_meta(stem)
    try:
        model = build_model(str(meta["arch"]), int(meta["num_classes"]))
    except ConvLensError as e:
        raise CheckpointError(f"checkpoint {meta_path(stem)}: {e}") from e
    state = load_weights(weights_path(stem), meta.get("sha256") if verify else None)
    load_state_dict(model, state, str(weights_path(stem)))
    return model.float().to(device).eval(), meta


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Save resume state (optimizer, scheduler, counters, RNG) atomically with torch.save."""
    _atomic_via_temp(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """Load resume state with weights_only=True: tensors and plain containers, never arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"resume state {path} is missing") from e
    except Exception as e:  # torch raises several types for a truncated zip or a refused global
        raise CheckpointError(f"resume state {path} is truncated or corrupted: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"resume state {path} is not a dictionary")
    return state
