"""Find and load a model by id from the run store, without the service: what a worker needs to render an atlas.

The service's registry (service/registry.py) lists models with caching, a default and compiled engines; a worker
only needs one checkpoint, so this module repeats the registry's precedence in a few lines: a finished run's best
checkpoint (`<home>/runs/<id>/checkpoints/best`), then registry.json's named checkpoints (stems inside home), then
`<folder>/<id>.{json,safetensors}` in each given folder (the shipped model's). Every load verifies the weights'
sha256 against their metadata, and `load_model` also against the hash the caller expects (the weights may have
changed since the job was queued).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.checkpoints import load_checkpoint, meta_path, read_meta, weights_path
from models.errors import CheckpointError, ConvLensError
from models.resnet import ResNet18
from models.runs import TERMINAL, validate_run_id


def _run_best(home: Path, model_id: str) -> Path | None:
    """A run's best checkpoint, once the run has finished (a running one still rewrites it)."""
    run_dir = home / "runs" / model_id
    try:
        status = json.loads((run_dir / "run.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    stem = run_dir / "checkpoints" / "best"
    return stem if status in TERMINAL and meta_path(stem).is_file() else None


def _named(home: Path, model_id: str) -> Path | None:
    """registry.json's `models[id]`, a stem relative to home that must stay inside it."""
    try:
        models = json.loads((home / "registry.json").read_text()).get("models")
    except (OSError, ValueError, AttributeError):
        return None
    rel = models.get(model_id) if isinstance(models, dict) else None
    if not isinstance(rel, str):
        return None
    root = home.resolve()
    stem = (root / rel).resolve()
    return stem if stem.is_relative_to(root) and meta_path(stem).is_file() else None


def find_checkpoint(home: Path, model_id: str, folders: Sequence[Path] = ()) -> Path | None:
    """The checkpoint stem of a model id, in the registry's order of precedence; None when no source has it."""
    validate_run_id(model_id)  # ids name folders: never a path
    home = Path(home)
    found = _run_best(home, model_id) or _named(home, model_id)
    if found is not None:
        return found
    for folder in folders:
        stem = Path(folder) / model_id
        if meta_path(stem).is_file() and weights_path(stem).is_file():
            return stem
    return None


def stem_in_store(home: Path, stem: Path) -> str:
    """How a job records a checkpoint: relative to home when inside it (the store may be mounted elsewhere on
    another machine), else absolute (a shipped model's folder)."""
    stem, root = Path(stem).resolve(), Path(home).resolve()
    return str(stem.relative_to(root)) if stem.is_relative_to(root) else str(stem)


def load_model(
    home: Path,
    model_id: str,
    sha256: str,
    recorded: str | None = None,
    folders: Sequence[Path] = (),
    device: str | torch.device = "cpu",
) -> tuple[ResNet18, dict[str, Any], Path]:
    """The model whose weights hash to `sha256`: at the recorded stem when it still holds them, else wherever the
    id is found now. A CheckpointError says why neither holds them (retrained, removed, corrupted)."""
    candidates: list[Path] = []
    if recorded:
        path = Path(recorded)
        candidates.append(path if path.is_absolute() else Path(home) / path)
    found = find_checkpoint(Path(home), model_id, folders)
    if found is not None:
        candidates.append(found)
    seen: list[str] = []
    for stem in candidates:
        try:
            meta = read_meta(stem)
        except ConvLensError as e:
            seen.append(str(e))
            continue
        if meta.get("sha256") != sha256:
            seen.append(f"{stem} now holds other weights (sha256 {str(meta.get('sha256'))[:12]}...)")
            continue
        model, meta = load_checkpoint(stem, device)
        return model, meta, stem
    why = "; ".join(seen) or "no checkpoint with that id"
    raise CheckpointError(f"the weights of model {model_id!r} (sha256 {sha256[:12]}...) are gone: {why}")
