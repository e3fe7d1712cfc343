"""The atlas job on a real worker: an atlas of a small random model end to end (POST /atlas on a real server, a
Celery worker on the embedded queue, the sheet), a worker SIGKILLed mid-atlas whose successor resumes without
rendering a finished chunk again (on both brokers), and, in-process, one delivery's rules (cancel keeps the
finished chunks, a warm shutdown hands the atlas back, duplicates are no-ops) and the reconciler's."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from jobqueue.app import send_atlas
from models.checkpoints import load_checkpoint, save_checkpoint
from models.featurevis import visualize
from models.featurevis.atlas import AtlasSpec, AtlasStore, atlas_id, make_spec, new_record
from models.loader import stem_in_store
from models.runs import RunStore
from tests.helpers import random_model, start_server, wait_for
from tests.worker.conftest import Stack
from worker.atlas import run_atlas_job
from worker.reconcile import atlas_jobs, reconcile
from worker.settings import WorkerSettings

MODEL = "rnd"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def add_random_model(home: Path, model_id: str = MODEL) -> Path:
    """A finished run holding a seeded random ResNet18 (seed stem, 32x32) as its best checkpoint."""
    RunStore(home).create_run({}, run_id=model_id, status="succeeded")
    stem = home / "runs" / model_id / "checkpoints" / "best"
    meta = {"arch": "resnet18", "num_classes": 10, "classes": CLASSES, "dataset": "cifar10", "input_size": 32}
    meta |= {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616], "created": time.time()}
    save_checkpoint(random_model("resnet18", seed=3), stem, meta)
    return stem


def submit(home: Path, queue: str, sender: Any, channels: list[int], layer: str, steps: int, chunk: int) -> str:
    """What POST /atlas does: the spec checked against the model, atlas.json written, the task sent by name."""
    stem = home / "runs" / MODEL / "checkpoints" / "best"
    model, meta = load_checkpoint(stem)
    spec = make_spec(model, layer, channels, "channel", steps, 0, chunk)
    aid = atlas_id(spec, meta)
    AtlasStore(home).create(new_record(aid, MODEL, meta["sha256"], stem_in_store(home, stem), spec, queue))
    if sender is not None:
        send_atlas(sender, aid)
    return aid


def chunk_files(store: AtlasStore, aid: str) -> dict[str, tuple[int, int]]:
    """Each finished chunk's (inode, mtime): a chunk written again would change both."""
    folder = store.dir(aid) / "chunks"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.slow
def test_an_atlas_end_to_end_on_a_real_worker(embedded_stack: Stack, tmp_path: Path) -> None:
    stack = embedded_stack
    add_random_model(stack.home)
    worker = stack.worker()
    env = {"CONVLENS_QUEUE": stack.queue, "CONVLENS_TENSORBOARD": "false"}
    server = start_server(stack.home, stack.data, env=env, log_dir=tmp_path)
    try:
        with server.client() as http:
            ask = {"model": MODEL, "layer": "layer2", "channels": "5,0,9,3,7,1", "steps": 12, "chunk": 4}
            r = http.post("/atlas", json=ask)
            assert r.status_code == 202, r.text
            aid = r.json()["id"]
            final = wait_for(
                lambda: (g := http.get(f"/atlas/{aid}").json())["status"] in ("succeeded", "failed") and g,
                240,
                lambda: f"the atlas to finish:\n{worker.log()[-3000:]}",
                0.5,
            )
            assert final["status"] == "succeeded", final
            assert final["chunks_done"] == final["chunks_total"] == 2 and final["attempts"] == 1
            assert final["layers"][0]["done"] == [5, 0, 9, 3, 7, 1] and final["progress"]["fraction"] == 1.0
            sheet = http.get(f"/atlas/{aid}/sheet.png")
            assert sheet.status_code == 200 and sheet.headers["x-convlens-complete"] == "true"
            assert sheet.headers["x-convlens-channels"] == "5,0,9,3,7,1" and sheet.headers["x-convlens-grid"] == "2,3"
            assert Image.open(io.BytesIO(sheet.content)).size == (3 * 128 + 4 * 2, 2 * 128 + 3 * 2)
            again = http.post("/atlas", json=ask)  # the same request: answered, never rendered again
            assert again.status_code == 200 and again.json()["id"] == aid and again.json()["status"] == "succeeded"
    finally:
        server.stop()
    # The worker's images are models/featurevis's for the same channels (one chunk = one optimization).
    store = AtlasStore(stack.home)
    chunk = store.read_chunk(aid, 0, "layer2", [5, 0, 9, 3])
    assert chunk is not None and chunk["attempt"] == 1
    model, meta = load_checkpoint(stack.home / "runs" / MODEL / "checkpoints" / "best")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's thread count: the same kernels, the same rounding
    try:
        fv = visualize(model, "layer2", [5, 0, 9, 3], meta["mean"], meta["std"], input_size=32, steps=12)
    finally:
        torch.set_num_threads(threads)
    assert (chunk["images"] - fv.images).abs().max() < 2e-2
    assert torch.allclose(chunk["values"], fv.values, rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_a_worker_killed_mid_atlas_is_resumed_without_rendering_a_finished_chunk_again(broker_stack: Stack) -> None:
    stack = broker_stack
    add_random_model(stack.home)
    store = AtlasStore(stack.home)
    w0 = stack.worker()
    channels = list(range(48))
    aid = submit(stack.home, stack.queue, stack.sender(), channels, "layer3", steps=24, chunk=4)
    total = 12
    wait_for(lambda: len(chunk_files(store, aid)) >= 2, 240, lambda: f"two chunks:\n{w0.log()[-3000:]}", 0.02)
    assert w0.proc is not None
    os.kill(w0.proc.pid, 9)  # SIGKILL, by its own PID
    w0.proc.wait(10)
    before = chunk_files(store, aid)
    rec = store.read(aid)
    assert rec["status"] == "running" and 2 <= len(before) < total, (rec["status"], before)

    w1 = stack.worker()  # its reconciler finds the dead lease and sends the atlas again
    done = wait_for(
        lambda: store.read(aid)["status"] in ("succeeded", "failed") and store.read(aid),
        300,
        lambda: f"the resumed atlas:\n{w1.log()[-3000:]}",
        0.5,
    )
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2 and done["lost"] == 1, done
    after = chunk_files(store, aid)
    assert len(after) == total
    assert {name: after[name] for name in before} == before, "a chunk finished before the kill was written again"
    spec = AtlasSpec.from_json(done["spec"])
    attempts = [store.read_chunk(aid, i, layer, ch)["attempt"] for i, (layer, ch) in enumerate(spec.plan())]  # type: ignore[index]
    assert attempts == [1] * len(before) + [2] * (total - len(before)), attempts
    assert [(a["attempt"], a["chunks_rendered"]) for a in done["attempt_log"]] == [(2, total - len(before))]
    assert "re-queued to resume after its last finished chunk" in w1.log() or "sending it again" in w1.log()
    assert not list((store.dir(aid) / "chunks").glob(".*.tmp"))  # what the kill left mid-write is tidied


# ---- in-process: one delivery's rules and the reconciler's, with the real store and renderer ---------------------


@pytest.fixture
def small(tmp_path: Path) -> tuple[AtlasStore, WorkerSettings, str]:
    home = tmp_path / "home"
    add_random_model(home)
    aid = submit(home, "q", None, [0, 1, 2, 3, 4, 5], "layer1", steps=2, chunk=2)
    settings = WorkerSettings(home=home, queue="q", device="cpu", stale_heartbeat_s=60)
    return AtlasStore(home), settings, aid


def test_one_delivery_renders_then_a_duplicate_is_a_no_op(small: tuple[AtlasStore, WorkerSettings, str]) -> None:
    store, settings, aid = small
    out = run_atlas_job(store, settings, aid, "w@test")
    assert out["status"] == "succeeded" and out["attempts"] == 1
    assert len(chunk_files(store, aid)) == 3
    again = run_atlas_job(store, settings, aid, "w@test")
    assert again["duplicate"] is True and store.read(aid)["attempts"] == 1
    assert run_atlas_job(store, settings, "atlas-nope", "w@test")["status"] == "missing"


def test_cancel_keeps_the_finished_chunks(small: tuple[AtlasStore, WorkerSettings, str]) -> None:
    store, settings, aid = small
    calls = []

    def stop_after_first_chunk() -> bool:  # the user cancels once the first chunk is on disk
        if chunk_files(store, aid) and not calls:
            calls.append(1)
            store.request_cancel(aid)
        return False

    out = run_atlas_job(store, settings, aid, "w@test", stop=stop_after_first_chunk)
    assert out["status"] == "cancelled"
    assert list(chunk_files(store, aid)) == ["0000.safetensors"]
    assert not (store.dir(aid) / "lease").exists()


def test_a_warm_shutdown_hands_the_atlas_back(small: tuple[AtlasStore, WorkerSettings, str]) -> None:
    store, settings, aid = small
    sent: list[str] = []
    out = run_atlas_job(store, settings, aid, "w@test", send=sent.append, stop=lambda: bool(chunk_files(store, aid)))
    assert out["requeued"] is True and sent == [aid]
    assert store.read(aid)["status"] == "queued" and store.read(aid)["progress"]["phase"] == "interrupted"
    out = run_atlas_job(store, settings, aid, "w@test")  # the next delivery renders the rest
    assert out["status"] == "succeeded" and out["attempts"] == 2 and len(chunk_files(store, aid)) == 3


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_the_reconciler_resends_what_the_broker_forgot(small: tuple[AtlasStore, WorkerSettings, str]) -> None:
    store, settings, aid = small
    other = submit(store.home, "another-queue", None, [0, 1], "layer1", steps=2, chunk=2)
    now = time.time() + 60  # past the grace period
    # Queued, with no message in the broker: sent again. Another queue's atlas is not this worker's business.
    jobs = atlas_jobs(store)
    assert reconcile(jobs, settings, lambda a: None, lambda: set(), now=now).resent == [aid]
    assert not reconcile(jobs, settings, lambda a: None, lambda: {aid}, now=now)
    assert not reconcile(jobs, settings, lambda a: None, lambda: None, now=now)  # broker unreadable
    # Running under the lease of a dead worker on this host: counted as lost, back to queued, sent again.
    owner = {"node": "w0@test", "host": socket.gethostname(), "pid": dead_pid(), "since": time.time()}
    (store.dir(aid) / "lease").write_text(json.dumps(owner))
    store.update(aid, status="running", heartbeat=time.time(), worker=owner)
    sent: list[str] = []
    assert reconcile(jobs, settings, sent.append, lambda: {aid}).requeued == [aid] and sent == [aid]
    rec = store.read(aid)
    assert rec["status"] == "queued" and rec["lost"] == 1 and not (store.dir(aid) / "lease").exists()
    assert store.read(other)["status"] == "queued"
