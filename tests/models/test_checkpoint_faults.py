"""Checkpoints under faults: a writer killed with SIGKILL at any moment, and a full disk.

A child process saves a real ResNet18 checkpoint over and over (each save a different model, its number in
both the weights and the metadata); the test kills it at chosen moments and then loads what is on disk.
Whatever moment the kill hit, the checkpoint must load with its sha256 verified and its weights must be the
ones its metadata describes: a pair of files that do not belong together is a corrupt checkpoint.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.checkpoints import load_checkpoint, meta_path, pending_path, tidy_checkpoints, weights_path
from models.errors import DiskFull
from tests.helpers import ROOT, small_tmpfs

WRITER = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from models.checkpoints import save_checkpoint
from models.resnet import build_model
model = build_model("resnet18", 10)
stem = Path(sys.argv[1])
i = int(sys.argv[2])
while True:
    i += 1
    with torch.no_grad():
        model.fc.bias.fill_(float(i))
    save_checkpoint(model, stem, {"arch": "resnet18", "num_classes": 10, "i": i})
    print(i, flush=True)
"""


def _consistent(stem: Path) -> int:
    """Load with the sha256 verified; the weights must carry the number the metadata says. Returns it."""
    model, meta = load_checkpoint(stem, verify=True)
    assert torch.all(model.fc.bias == float(meta["i"])), f"weights of save {model.fc.bias[0]} under meta {meta['i']}"
    return int(meta["i"])


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _start(stem: Path, first: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(stem), str(first)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )


def _kill_when(proc: subprocess.Popen[str], ready: object, timeout: float = 60.0) -> None:
    """SIGKILL the writer the moment `ready()` is true (polled tightly), or at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ready():  # type: ignore[operator]
        if proc.poll() is not None:
            raise AssertionError(f"the writer exited with {proc.returncode}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.mark.slow
def test_sigkill_at_any_moment_of_a_checkpoint_write_leaves_a_valid_checkpoint(tmp_path: Path) -> None:
    stem = tmp_path / "ck" / "best"
    wpath = weights_path(stem)
    rng = random.Random(0)
    last = 0
    renamed = {"metadata renamed": meta_path(stem), "weights renamed": wpath}
    hits = {"temp file": 0, **dict.fromkeys(renamed, 0), "random": 0}
    for round_ in range(8):
        proc = _start(stem, last * 10 + 1000 * round_)
        assert proc.stdout is not None
        first = int(proc.stdout.readline())  # one whole save done: the old checkpoint exists from here on
        moment = list(hits)[round_ % len(hits)]
        if moment == "temp file":  # mid-write: a temp file of the next save exists
            _kill_when(proc, lambda: any(p.name.endswith(".tmp") for p in stem.parent.iterdir()))
        elif moment in renamed:  # the instant one file of the new pair lands, before the other can follow
            path = renamed[moment]
            _kill_when(proc, lambda path=path, ino=_inode(path): _inode(path) not in (ino, None))
        else:
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        hits[moment] += any(p.name.startswith(".") for p in stem.parent.iterdir())  # a save was cut short
        last = _consistent(stem)
        assert last >= first
    assert hits["temp file"] >= 1 and hits["metadata renamed"] >= 1, f"no kill landed inside a save: {hits}"
    assert tidy_checkpoints(stem.parent) is not None and _consistent(stem) == last  # tidied, still the same
    assert not [p.name for p in stem.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_full_disk_fails_the_save_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    """ENOSPC mid-write (a small tmpfs): the save raises, the previous checkpoint still loads, no temp file stays."""
    from models.checkpoints import save_checkpoint
    from models.resnet import build_model

    with small_tmpfs(tmp_path / "small", "60m") as mnt:
        model = build_model("resnet18", 10)
        stem = mnt / "best"
        with torch.no_grad():
            model.fc.bias.fill_(1.0)
        save_checkpoint(model, stem, {"arch": "resnet18", "num_classes": 10, "i": 1})  # 45 MB: fits once
        with torch.no_grad():
            model.fc.bias.fill_(2.0)
        with pytest.raises(DiskFull, match="no space left on device"):
            save_checkpoint(model, stem, {"arch": "resnet18", "num_classes": 10, "i": 2})
        assert _consistent(stem) == 1
        assert sorted(p.name for p in mnt.iterdir()) == ["best.json", "best.safetensors"]
        assert not pending_path(stem).exists()
