"""Checkpoints: safetensors weights + JSON metadata, resume state, every write atomic."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from models.atomic import _atomic_via_temp
from models.atomic import atomic_write_bytes as atomic_write_bytes  # re-exported: callers predate models.atomic
from models.atomic import atomic_write_json as atomic_write_json
from models.atomic import sha256_file as sha256_file
from models.errors import CheckpointError, ConvLensError
from models.resnet import ResNet18, build_model

WEIGHTS = ".safetensors"
META = ".json"


def versions() -> dict[str, str]:
    """Library versions recorded beside every checkpoint."""
    import safetensors

    return {"torch": torch.__version__, "safetensors": safetensors.__version__, "python": platform.python_version()}


def weights_path(stem: Path) -> Path:
    """`.../best` or `.../best.json` or `.../best.safetensors` -> `.../best.safetensors`."""
    return stem.with_suffix(WEIGHTS) if stem.suffix in (WEIGHTS, META) else Path(f"{stem}{WEIGHTS}")


def pending_path(stem: Path) -> Path:
    """Where new weights wait, complete, until their metadata commits them (see save_checkpoint)."""
    w = weights_path(stem)
    return w.with_name(f".{w.name}.pending")


def meta_path(stem: Path) -> Path:
    """The metadata JSON beside a checkpoint's weights."""
    return weights_path(stem).with_suffix(META)


def save_checkpoint(model: torch.nn.Module, stem: Path, meta: dict[str, Any], half: bool = False) -> dict[str, Any]:
    """Save weights (safetensors) and metadata (JSON with the weights' sha256) as one commit; returns the metadata.

    The new weights are written, complete and fsynced, beside the old ones (`pending_path`); the metadata's
    atomic rename is the commit point; then the weights are renamed into place. A kill at any moment leaves
    either the old pair or the new metadata with its weights still pending, which `load_weights` reads and
    `tidy_checkpoints` finishes: never metadata that describes other weights.
    """
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    wpath, pending = weights_path(stem), pending_path(stem)
    _atomic_via_temp(pending, lambda tmp: save_file(state, tmp, metadata={"arch": str(meta.get("arch", ""))}))
    full = {**meta, "sha256": sha256_file(pending), "weights": wpath.name, "versions": versions()}
    atomic_write_json(meta_path(stem), full)
    os.replace(pending, wpath)
    return full


def tidy_checkpoints(folder: Path) -> list[str]:
    """Finish saves a kill interrupted (pending weights their metadata committed) and drop the rest of them.

    For the one writer of a folder (the trainer holding the run's lease), before it writes; returns what it did.
    """
    done = []
    # Ours are `.<name>.<random>.tmp`; safetensors' own writer (Rust's tempfile) leaves `.tmp<random>`.
    for tmp in {*folder.glob(".*.tmp"), *folder.glob(".tmp*")}:
        tmp.unlink(missing_ok=True)
        done.append(f"removed {tmp.name}")
    for pending in folder.glob(f".*{WEIGHTS}.pending"):
        stem = folder / pending.name[1 : -len(f"{WEIGHTS}.pending")]
        try:
            committed = json.loads(meta_path(stem).read_text()).get("sha256") == sha256_file(pending)
        except (OSError, ValueError):
            committed = False
        if committed:
            os.replace(pending, weights_path(stem))
            done.append(f"finished {weights_path(stem).name}")
        else:
            pending.unlink(missing_ok=True)
            done.append(f"removed {pending.name}")
    return done


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
    """Read a safetensors file, verifying its sha256 when given; corruption is a CheckpointError.

    The file is read once and verified and parsed from the same bytes. When the metadata committed weights
    that a killed save left pending (see save_checkpoint), those are read instead.
    """
    data = _read(path)
    if expected_sha256 is not None and (data is None or hashlib.sha256(data).hexdigest() != expected_sha256):
        pending = _read(pending_path(path))
        if pending is not None and hashlib.sha256(pending).hexdigest() == expected_sha256:
            data = pending
        elif data is not None:
            actual = hashlib.sha256(data).hexdigest()
            raise CheckpointError(
                f"checkpoint weights {path} are corrupted or were replaced: sha256 {actual[:12]}... "
                f"does not match the recorded {expected_sha256[:12]}..."
            )
    if data is None:
        raise CheckpointError(f"checkpoint weights {path} are missing")
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint weights {path} are truncated or corrupted: {e}") from e


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None


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
