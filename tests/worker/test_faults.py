"""Faults around a real worker: SIGKILL in the middle of a checkpoint write, and a run store that fills up.

Jobs must end `failed` with a reason or resume; checkpoints are never corrupt; the API keeps answering. Each test
runs on both brokers (Redis and the embedded file queue). (SIGKILL between steps, Redis restarts and warm shutdown
are in test_tasks.py.)
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
from tests.helpers import small_tmpfs, start_server, wait_for
from tests.worker.conftest import BROKERS, Stack, open_stack


def _all_checkpoints_load(store: RunStore, rid: str) -> list[str]:
    """Every checkpoint of the run loads with its sha256 verified; returns their names."""
    ckdir = store.checkpoints_dir(rid)
    names = sorted(p.stem for p in ckdir.glob("*.json"))
    for name in names:
        load_checkpoint(ckdir / name, verify=True)
    return names


def _dot_files(store: RunStore, rid: str) -> list[str]:
    return [p.name for p in store.checkpoints_dir(rid).iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume(broker_stack: Stack) -> None:
    stack, store = broker_stack, broker_stack.store
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


@pytest.fixture(params=BROKERS)
def small_stack(
    request: pytest.FixtureRequest, tmp_path: Path, synthetic_data: Path, queue_name: str
) -> Iterator[Stack]:
    """A stack on each broker whose run store (and file queue) is a 70 MB tmpfs: room for one 45 MB checkpoint."""
    with (
        small_tmpfs(tmp_path / "home", "70m") as home,
        open_stack(request.param, home, synthetic_data, queue_name) as s,
    ):
        yield s


@pytest.mark.slow
def test_a_full_run_store_fails_the_job_with_a_reason_and_nothing_else(small_stack: Stack, tmp_path: Path) -> None:
    stack, small_store = small_stack, small_stack.home
    logs = tmp_path / "logs"  # logs off the small disk
    env = {"CONVLENS_QUEUE": stack.queue, "CONVLENS_SHIPPED_MODELS": "false"}
    env |= {"CONVLENS_BROKER_URL": stack.broker_url} if stack.broker_url else {}
    server = start_server(small_store, stack.data, env=env, log_dir=logs)
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
