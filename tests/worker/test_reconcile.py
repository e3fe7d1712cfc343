"""Leases and the reconciler on a real run store (fast: no training, no worker process)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from jobqueue.app import send_train, sender_app
from models.runs import RunStore
from tests.worker.conftest import REDIS_URL, cleanup_redis, redis_up
from worker.reconcile import LEASE, Lease, lease_state, owner_info, reconcile, run_jobs
from worker.settings import WorkerSettings


@pytest.fixture
def settings(tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(home=tmp_path, stale_heartbeat_s=30, max_attempts=3, requeue_grace_s=5, queue="train")


def _run(store: RunStore, status: str, **fields: object) -> str:
    rid = store.create_run({"epochs": 2}, status=status)
    return store.update_run(rid, queue="train", **fields)["id"]  # type: ignore[no-any-return]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()  # reaped: the pid names no process now
    return p.pid


def _foreign_lease(run_dir: Path, host: str, pid: int, age_s: float = 0.0) -> None:
    path = run_dir / LEASE
    path.write_text(json.dumps({"node": "old@box", "host": host, "pid": pid}))
    t = time.time() - age_s
    os.utime(path, (t, t))


def test_lease_is_exclusive_and_released(tmp_path: Path, settings: WorkerSettings) -> None:
    lease = Lease.claim(tmp_path, owner_info("a"), settings)
    assert lease is not None and lease_state(tmp_path, 30)[0] == "alive"
    assert Lease.claim(tmp_path, owner_info("b"), settings) is None
    lease.release()
    assert lease_state(tmp_path, 30)[0] == "absent" and not (tmp_path / LEASE).exists()


def test_dead_holders_are_recognised(tmp_path: Path, settings: WorkerSettings) -> None:
    import socket

    pid = _dead_pid()
    _foreign_lease(tmp_path, socket.gethostname(), pid)
    assert lease_state(tmp_path, 30) == ("dead", f"worker old@box (pid {pid}) is gone")
    _foreign_lease(tmp_path, "elsewhere", 1, age_s=5)
    assert lease_state(tmp_path, 30)[0] == "alive"  # another host, refreshed recently
    _foreign_lease(tmp_path, "elsewhere", 1, age_s=31)
    assert lease_state(tmp_path, 30)[0] == "dead"
    lease = Lease.claim(tmp_path, owner_info("new"), settings)  # breaks the dead lease
    assert lease is not None and json.loads((tmp_path / LEASE).read_text())["node"] == "new"
    lease.release()


def test_lease_refresh_and_takeover_detection(tmp_path: Path) -> None:
    s = WorkerSettings(home=tmp_path, stale_heartbeat_s=1.2)  # refresh every 0.2 s
    with Lease.claim(tmp_path, owner_info("a"), s) as lease:  # type: ignore[union-attr]
        old = (tmp_path / LEASE).stat().st_mtime
        time.sleep(0.5)
        assert (tmp_path / LEASE).stat().st_mtime > old and not lease.lost
        (tmp_path / LEASE).unlink()  # what a reconciler that took us for dead does
        time.sleep(0.5)
        assert lease.lost


def test_orphaned_running_run_is_requeued_then_failed(tmp_path: Path, settings: WorkerSettings) -> None:
    import socket

    store = RunStore(tmp_path)
    rid = _run(store, "running", progress={"epoch": 3}, heartbeat=time.time())
    sent: list[str] = []
    for attempt in (1, 2):
        _foreign_lease(store.run_dir(rid), socket.gethostname(), _dead_pid())
        report = reconcile(run_jobs(store), settings, sent.append, waiting=set)
        run = store.read_run(rid)
        assert report.requeued == [rid] and run["status"] == "queued" and run["lost"] == attempt
        assert run["progress"]["phase"] == "requeued" and run["progress"]["epoch"] == 3
        assert not (store.run_dir(rid) / LEASE).exists()
        store.update_run(rid, status="running")  # the next worker takes it ... and dies too
    _foreign_lease(store.run_dir(rid), socket.gethostname(), _dead_pid())
    report = reconcile(run_jobs(store), settings, sent.append, waiting=set)
    run = store.read_run(rid)
    assert report.failed == [rid] and run["status"] == "failed" and "worker lost 3 times" in run["error"]
    assert sent == [rid, rid]


def test_live_and_foreign_runs_are_left_alone(tmp_path: Path, settings: WorkerSettings) -> None:
    store = RunStore(tmp_path)
    live = _run(store, "running", heartbeat=time.time())
    _foreign_lease(store.run_dir(live), "elsewhere", 1)
    local = store.create_run({"epochs": 2}, status="running")  # a `convlens train` run: no queue field
    fresh = _run(store, "running", heartbeat=time.time())  # no lease yet, heartbeat fresh
    sent: list[str] = []
    assert not reconcile(run_jobs(store), settings, sent.append, waiting=set)
    assert [store.read_run(r)["status"] for r in (live, local, fresh)] == ["running"] * 3 and sent == []


def test_queued_runs_missing_from_the_broker_are_sent_again(tmp_path: Path, settings: WorkerSettings) -> None:
    store = RunStore(tmp_path)
    lost, waiting, cancelled, taken = (_run(store, "queued") for _ in range(4))
    store.request_cancel(cancelled)
    _foreign_lease(store.run_dir(taken), "elsewhere", 1)  # a worker fetched its message and holds it
    sent: list[str] = []
    jobs = run_jobs(store)
    assert not reconcile(jobs, settings, sent.append, waiting=lambda: {waiting})  # all younger than the grace period
    later = time.time() + 10
    report = reconcile(jobs, settings, sent.append, waiting=lambda: {waiting}, now=later)
    assert store.read_run(taken)["status"] == "queued"  # not sent twice: its holder is alive
    assert sent == [lost] and report.resent == [lost] and report.cancelled == [cancelled]
    assert store.read_run(cancelled)["status"] == "cancelled"
    assert not reconcile(jobs, settings, sent.append, waiting=lambda: None, now=later)  # broker unknown: no guessing


def test_cancel_requested_orphan_ends_cancelled(tmp_path: Path, settings: WorkerSettings) -> None:
    import socket

    store = RunStore(tmp_path)
    rid = _run(store, "running")
    store.request_cancel(rid)
    _foreign_lease(store.run_dir(rid), socket.gethostname(), _dead_pid())
    sent: list[str] = []
    assert reconcile(run_jobs(store), settings, sent.append, waiting=set).cancelled == [rid]
    assert store.read_run(rid)["status"] == "cancelled" and sent == []


def test_waiting_ids_on_redis(tmp_path: Path) -> None:
    if not redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379")
    from worker.reconcile import waiting_run_ids

    queue = f"t-{os.urandom(5).hex()}"
    app = sender_app(WorkerSettings(broker_url=REDIS_URL, home=tmp_path, queue=queue))
    try:
        send_train(app, "r1")
        send_train(app, "r2")
        assert waiting_run_ids(app, queue) == {"r1", "r2"}
    finally:
        cleanup_redis(REDIS_URL, queue)
    assert waiting_run_ids(app, queue) == set()
