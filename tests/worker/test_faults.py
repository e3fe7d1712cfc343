"""Faults around a real worker: SIGKILL in the middle of a checkpoint write, and a run store that fills up.

Jobs must end `failed` with a reason or resume; checkpoints are never corrupt; the API keeps answering.
(SIGKILL between steps, Redis restarts and warm shutdown are in test_tasks.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.checkpoints import load_checkpoint
from models.runs import RunStore
from tests.helpers import start_server
from tests.worker.conftest import REDIS_URL, Stack, cleanup_redis, redis_up, wait_for


def _all_checkpoints_load(store: RunStore, rid: str) -> list[str]:
    """Every checkpoint of the run loads with its sha256 verified; returns their names."""
    ckdir = store.checkpoints_dir(rid)
    names = sorted(p.stem for p in ckdir.glob("*.json"))
    for name in names:
        load_checkpoint(ckdir / name, verify=True)
    return names


def _dot_files(store: RunStore, rid: str) -> list[str]:
    return [p.name for p in store.checkpoints_dir(rid).iterdir() if p.name.startswith(".")]


def test_sigkill_during_a_checkpoint_write_then_resume(redis_stack: Stack) -> None:
    stack, store = redis_stack, redis_stack.store
    w0 = stack.worker()
    rid = stack.submit(stack.sender(), epochs=3)
    ckdir = store.checkpoints_dir(rid)
    # Poll tightly for the temp file of the first checkpoint (45 MB: tens of ms to write) and kill right then.
    wait_for(lambda: ckdir.is_dir() and any(p.name.endswith(".tmp") for p in ckdir.iterdir()), 180, "a write", 0.001)
    assert w0.proc is not None
    os.kill(w0.proc.pid, signal.SIGKILL)
    w0.proc.wait(10)
    cut_short = _dot_files(store, rid)
    assert cut_short, "the kill did not land during a write"
    _all_checkpoints_load(store, rid)  # whatever is already there is whole

    w1 = stack.worker()
    wait_for(lambda: store.read_run(rid)["status"] == "succeeded", 240, "the resumed job to finish")
    run = store.read_run(rid)
    assert run["lost"] == 1 and run["attempts"] == 2, run
    assert "re-queued from its last checkpoint" in w1.log()
    assert {"best", "epoch-0001", "epoch-0002", "epoch-0003"} <= set(_all_checkpoints_load(store, rid))
    assert _dot_files(store, rid) == []  # the resumed attempt tidied what the kill left


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A run store on a 70 MB tmpfs: room for one 45 MB checkpoint, not for two."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    home = tmp_path / "home"
    home.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=70m", "tmpfs", str(home)], capture_output=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    yield home
    subprocess.run(["umount", "-l", str(home)], check=False)


def test_a_full_run_store_fails_the_job_with_a_reason_and_nothing_else(
    small_store: Path, tmp_path: Path, synthetic_data: Path, queue_name: str
) -> None:
    if not redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379 (.ci/run starts one)")
    stack = Stack(small_store, synthetic_data, REDIS_URL, queue_name)
    logs = tmp_path / "logs"  # logs off the small disk
    env = {"CONVLENS_BROKER_URL": REDIS_URL, "CONVLENS_QUEUE": queue_name, "CONVLENS_SHIPPED_MODELS": "false"}
    server = start_server(small_store, synthetic_data, env=env, log_dir=logs)
    try:
        w = stack.worker()
        store = stack.store
        rid = stack.submit(stack.sender(), epochs=2, keep_last=1)
        wait_for(lambda: store.read_run(rid)["status"] in ("failed", "succeeded"), 180, "the job to end")
        run = store.read_run(rid)
        assert run["status"] == "failed", run
        assert "no space left on device" in run["error"], run["error"]
        assert w.proc is not None and w.proc.poll() is None  # the worker lives on
        _all_checkpoints_load(store, rid)  # epoch 1 fitted; the best copy did not, and left nothing behind
        assert _dot_files(store, rid) == []

        filler = small_store / "filler"  # now fill the disk to the last byte
        with filler.open("wb") as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        job = {"epochs": 1, "train_limit": 100, "val_size": 100, "milestones": [], "batch_size": 50}
        with server.client() as http:  # the API answers, and says why
            assert http.get("/health").status_code == 200
            got = http.get(f"/jobs/{rid}").json()
            assert got["status"] == "failed" and "no space left" in got["error"]
            assert http.get("/jobs").status_code == 200
            full = http.post("/train", json=job)
            assert full.status_code == 507 and "no space left on device" in full.json()["detail"], full.text
            assert [r["id"] for r in http.get("/jobs").json()["jobs"]] == [rid]  # nothing half-created

            filler.unlink()
            subprocess.run(["mount", "-o", "remount,size=400m", str(small_store)], check=True)  # space again
            again = http.post("/train", json=job)
            assert again.status_code == 202, again.text
        wait_for(lambda: store.read_run(again.json()["id"])["status"] == "succeeded", 180, "a job with space")
    finally:
        server.stop()
        stack.close()
        cleanup_redis(REDIS_URL, queue_name, small_store)
