"""The train task: its delivery logic in-process, then real workers killed, stopped and restarted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from models.runs import RunStore
from tests.helpers import RedisServer, wait_for
from tests.worker.conftest import Stack, epoch_checkpointed, epochs_logged, job_config
from worker.reconcile import LEASE, Lease, owner_info, waiting_run_ids
from worker.settings import WorkerSettings
from worker.tasks import run_job


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path)


def _settings(store: RunStore, data: Path, **kw: object) -> WorkerSettings:
    return WorkerSettings(home=store.home, data_dir=data, device="cpu", tensorboard=False, **kw)  # type: ignore[arg-type]


def test_deliveries_that_must_not_train(store: RunStore, synthetic_data: Path) -> None:
    s = _settings(store, synthetic_data, max_attempts=1)
    assert run_job(store, s, "nope", "n")["status"] == "missing"
    done = store.create_run(job_config(), status="succeeded")
    assert run_job(store, s, done, "n")["duplicate"] is True
    held = store.create_run(job_config())
    with Lease.claim(store.run_dir(held), owner_info("other"), s):  # type: ignore[union-attr]
        assert run_job(store, s, held, "n")["duplicate"] is True
    assert store.read_run(held)["status"] == "queued"
    sent: list[str] = []  # a warm shutdown began before this delivery: hand it back, do not start
    assert run_job(store, s, held, "n", send=sent.append, stop=lambda: True)["requeued"] and sent == [held]
    bad = store.create_run({**job_config(), "epochs": 0})
    out = run_job(store, s, bad, "n")
    assert out["status"] == "failed" and "epochs" in out["error"]
    orphan = store.create_run(job_config(), status="running")  # its worker died; max_attempts=1
    out = run_job(store, s, orphan, "n")
    assert out["status"] == "failed" and "worker lost 1 times" in out["error"]
    assert not (store.run_dir(orphan) / LEASE).exists()


def test_stop_requested_hands_the_job_back(store: RunStore, synthetic_data: Path) -> None:
    rid = store.create_run(job_config())
    sent: list[str] = []
    stop = lambda: store.read_run(rid)["status"] == "running"  # noqa: E731  # a shutdown once training began
    out = run_job(store, _settings(store, synthetic_data), rid, "n", send=sent.append, stop=stop)
    run = store.read_run(rid)
    assert out["requeued"] and run["status"] == "queued" and run["progress"]["phase"] == "interrupted"
    assert sent == [rid] and run["worker"]["node"] == "n" and not (store.run_dir(rid) / LEASE).exists()


def _assert_resumed(store: RunStore, rid: str, killed_at: float, attempts: int, epochs: int = 3) -> None:
    """It finished, and epoch 1 was trained once, before the kill: later attempts continued from it."""
    run = store.read_run(rid)
    assert run["status"] == "succeeded", run
    assert run["attempts"] == attempts and run["lost"] == 1, run
    records = store.metrics(rid).read()
    assert epochs_logged(store, rid) == list(range(1, epochs + 1))
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == list(range(1, 2 * epochs + 1))  # no step twice, none missing
    epoch1 = next(r for r in records if r["kind"] == "epoch" and r["epoch"] == 1)
    ckpt1 = json.loads((store.checkpoints_dir(rid) / "epoch-0001.json").read_text())
    assert epoch1["time"] < killed_at and ckpt1["created"] < killed_at
    assert (store.checkpoints_dir(rid) / "best.safetensors").is_file()


@pytest.mark.slow
def test_kill_resume_and_warm_shutdown(broker_stack: Stack) -> None:
    stack, store = broker_stack, broker_stack.store
    w0 = stack.worker()
    sender = stack.sender()
    rid = stack.submit(sender, epochs=3)
    wait_for(lambda: epoch_checkpointed(store, rid, 1), 180, "epoch 1 of the first attempt")
    w0.kill()
    killed_at = time.time()
    assert "has no message" not in w0.log()  # it came through the queue, not the reconciler
    # The file queue dropped the message at delivery; Redis parks the unacked one for visibility_timeout (days):
    # either way only the run store knows the job, and the reconciler must send it again.
    assert store.read_run(rid)["status"] == "running" and waiting_run_ids(sender, stack.queue) == set()

    stack.worker()  # its reconciler re-queues the job; the job resumes after epoch 1
    wait_for(lambda: any(r["step"] > 2 for r in store.metrics(rid).read()), 120, "a step of the second attempt")
    assert stack.workers[1].stop() == 0  # SIGTERM: stops after this step, hands the job back
    assert "re-queued from its last checkpoint" in stack.workers[1].log()
    run = store.read_run(rid)
    assert run["status"] == "queued" and run["progress"]["phase"] == "interrupted"
    assert waiting_run_ids(sender, stack.queue) == {rid}

    stack.worker(cli=True)  # `convlens worker` this time
    wait_for(lambda: store.read_run(rid)["status"] == "succeeded", 240, "the job to finish")
    _assert_resumed(store, rid, killed_at, attempts=3)


@pytest.mark.slow
def test_redis_restart_mid_job(tmp_path: Path, synthetic_data: Path, own_redis: RedisServer) -> None:
    stack = Stack(tmp_path / "home", synthetic_data, own_redis.url, "train")
    try:
        stack.worker()
        sender = stack.sender()
        first = stack.submit(sender, epochs=2)
        second = stack.submit(sender, epochs=1)  # waits in Redis, which forgets it on restart
        store = stack.store
        wait_for(lambda: store.metrics(first).read(), 120, "the first job's first step")
        own_redis.stop()
        time.sleep(1.0)
        own_redis.start()
        wait_for(lambda: store.read_run(first)["status"] == "succeeded", 180, "the first job to finish")
        wait_for(lambda: store.read_run(second)["status"] == "succeeded", 180, "the lost job to be re-sent and run")
        assert f"run {second} is queued but has no message" in stack.workers[0].log()
        assert store.read_run(first)["attempts"] == 1  # it kept running through the outage
    finally:
        stack.close()
