"""Checkpoints: round trip, mismatch, corruption, safe resume state, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from models.checkpoints import (
    atomic_write_bytes,
    load_checkpoint,
    load_state,
    meta_path,
    save_checkpoint,
    save_state,
    weights_path,
)
from models.errors import CheckpointError
from models.resnet import build_model

META = {"arch": "resnet18", "num_classes": 10, "dataset": "cifar10", "classes": [str(i) for i in range(10)]}


def _saved(tmp_path: Path, half: bool = False) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    stem = tmp_path / "ck"
    save_checkpoint(model, stem, META, half=half)
    return model, stem


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model, stem = _saved(tmp_path)
    loaded, meta = load_checkpoint(stem)
    assert meta["arch"] == "resnet18" and len(meta["sha256"]) == 64 and "torch" in meta["versions"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]  # no temp files left


def test_half_precision_round_trip_is_close(tmp_path: Path) -> None:
    model, stem = _saved(tmp_path, half=True)
    assert weights_path(stem).stat().st_size < 24_000_000
    loaded, _ = load_checkpoint(stem)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=5e-2, rtol=5e-2)
    assert next(loaded.parameters()).dtype == torch.float32


def test_architecture_mismatch_is_reported(tmp_path: Path) -> None:
    _, stem = _saved(tmp_path)
    meta = json.loads(meta_path(stem).read_text())
    meta["arch"] = "resnet18-cifar"
    meta_path(stem).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"does not fit.*conv1.weight"):
        load_checkpoint(stem)
    meta["arch"] = "vgg16"
    meta_path(stem).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_checkpoint(stem)


def test_truncated_and_corrupted_files_are_reported(tmp_path: Path) -> None:
    _, stem = _saved(tmp_path)
    w = weights_path(stem)
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(stem)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(stem, verify=False)
    w.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="corrupted or were replaced"):
        load_checkpoint(stem)
    meta_path(stem).write_text("{not json")
    with pytest.raises(CheckpointError, match="metadata .* is corrupted"):
        load_checkpoint(stem)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nothing")


def test_resume_state_round_trip_and_refuses_pickled_objects(tmp_path: Path) -> None:
    model = build_model("resnet18-cifar", 10)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [10, 15], 0.4)
    gen = torch.Generator().manual_seed(3)
    path = tmp_path / "state.pt"
    save_state(
        path,
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "generator": gen.get_state(),
            "epoch": 3,
            "step": 30,
        },
    )
    st = load_state(path)
    assert st["epoch"] == 3 and torch.equal(st["generator"], gen.get_state())
    sched.load_state_dict(st["scheduler"])

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("echo pwned",))

    torch.save({"x": Payload()}, path)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_state(path)
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError):
        load_state(path)


def test_failed_atomic_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, 123)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
