"""Real processes for the queue tests: Celery workers (Redis or the embedded file queue) and redis-servers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from models.runs import RunStore
from tests.helpers import REDIS_URL, ROOT, RedisServer, free_port, redis_up, wait_for

BROKERS = ("embedded", "redis")


def job_config(**overrides: Any) -> dict[str, Any]:
    """A small job on the synthetic data: 2 steps an epoch, every step logged, every checkpoint kept."""
    cfg = {"epochs": 2, "batch_size": 50, "val_size": 100, "milestones": [], "train_limit": 100, "log_every": 1}
    return {**cfg, "keep_last": 10, **overrides}


def epochs_logged(store: RunStore, run_id: str) -> list[int]:
    return [r["epoch"] for r in store.metrics(run_id).read() if r.get("kind") == "epoch"]


def epoch_checkpointed(store: RunStore, run_id: str, epoch: int) -> bool:
    """The epoch is logged and its resume state saved (the state is written after the record)."""
    return epoch in epochs_logged(store, run_id) and (store.checkpoints_dir(run_id) / "state.pt").is_file()


@dataclass
class Worker:
    """One `celery worker` process, started and stopped by its PID."""

    env: dict[str, str]
    log_path: Path
    name: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0, cli: bool = False) -> Worker:
        """`celery -A worker.celery_app worker ...`, or `convlens worker` (which adds the same options)."""
        if cli:
            cmd = [sys.executable, "-m", "convlens", "worker", "-n", f"{self.name}@%h"]
        else:
            cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=solo"]
            cmd += ["-Q", self.env["CONVLENS_QUEUE"], "-n", f"{self.name}@%h", "-l", "info"]
            cmd += ["--without-mingle", "--without-gossip"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._ready(start), timeout, lambda: f"worker {self.name} ready:\n{self.log()[-3000:]}", 0.2)
        return self

    def _ready(self, start: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        with self.log_path.open("rb") as f:
            f.seek(start)
            return b" ready." in f.read()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL, then reap it (a zombie would still look alive to the next worker's lease check)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (Celery's warm shutdown) and wait; SIGKILL if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


@dataclass
class Stack:
    """A run store, a queue, and the workers started on it (all stopped at teardown)."""

    home: Path
    data: Path
    broker_url: str | None
    queue: str
    extra_env: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    @property
    def store(self) -> RunStore:
        return RunStore(self.home)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLENS_")}
        env.update(
            {
                "CONVLENS_HOME": str(self.home),
                "CONVLENS_DATA_DIR": str(self.data),
                "CONVLENS_QUEUE": self.queue,
                "CONVLENS_DEVICE": "cpu",
                "CONVLENS_TENSORBOARD": "false",
                "CONVLENS_TORCH_THREADS": "1",  # two cores, shared with the test process and the API
                "CONVLENS_RECONCILE_INTERVAL_S": "2",
                "CONVLENS_REQUEUE_GRACE_S": "1",
                "PYTHONPATH": str(ROOT),
                **({"CONVLENS_BROKER_URL": self.broker_url} if self.broker_url else {}),
                **self.extra_env,
            }
        )
        return env

    def worker(self, cli: bool = False) -> Worker:
        w = Worker(self.env(), self.home / f"worker-{len(self.workers)}.log", f"w{len(self.workers)}-{self.queue}")
        self.workers.append(w)
        return w.start(cli=cli)

    def sender(self) -> Any:
        from jobqueue.app import sender_app
        from worker.settings import WorkerSettings

        return sender_app(WorkerSettings(broker_url=self.broker_url, home=self.home, queue=self.queue))

    def submit(self, sender: Any, **cfg: Any) -> str:
        """What POST /train does: create the run (queued, with its queue), then send it by task name."""
        from jobqueue.app import send_train
        from models.config import TrainConfig

        store = self.store
        run_id = store.create_run(TrainConfig.model_validate(job_config(**cfg)).model_dump())
        store.update_run(run_id, queue=self.queue)
        send_train(sender, run_id)
        return run_id

    def close(self) -> None:
        for w in self.workers:
            w.kill()  # teardown: a warm shutdown of an idle worker costs seconds; tests that need one say so


def cleanup_redis(url: str, queue: str, home: Path | None = None) -> None:
    """Remove this test's keys only (queue lists, bindings, unacked entries, results): never a flush."""
    import redis

    r = redis.Redis.from_url(url)
    run_ids = [run["id"] for run in RunStore(home).list_runs()] if home else []
    with contextlib.suppress(redis.RedisError):
        for pattern in (f"{queue}*", f"_kombu.binding*.{queue}"):
            for key in r.scan_iter(pattern):
                r.delete(key)
        for rid in run_ids:
            r.delete(f"celery-task-meta-{rid}")
        for tag, raw in r.hgetall("unacked").items():
            with contextlib.suppress(ValueError, IndexError):
                if json.loads(raw)[2] == queue:
                    r.hdel("unacked", tag)
                    r.zrem("unacked_index", tag)


@pytest.fixture
def queue_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def open_stack(broker: str, home: Path, data: Path, queue: str) -> Iterator[Stack]:
    """A stack on `broker` (one of BROKERS; "redis" is the shared Redis: skipped without it), closed afterwards."""
    url = None
    if broker == "redis":
        if not redis_up():
            pytest.skip("no Redis on 127.0.0.1:6379 (.ci/run starts one)")
        url = REDIS_URL
    stack = Stack(home, data, url, queue)
    try:
        yield stack
    finally:
        stack.close()
        if url:
            cleanup_redis(url, queue, home)


@pytest.fixture
def embedded_stack(tmp_path: Path, synthetic_data: Path, queue_name: str) -> Iterator[Stack]:
    with open_stack("embedded", tmp_path / "home", synthetic_data, queue_name) as stack:
        yield stack


@pytest.fixture(params=BROKERS)
def broker_stack(
    request: pytest.FixtureRequest, tmp_path: Path, synthetic_data: Path, queue_name: str
) -> Iterator[Stack]:
    """The same test on each broker: the embedded file queue, then Redis."""
    with open_stack(request.param, tmp_path / "home", synthetic_data, queue_name) as stack:
        yield stack


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(free_port()).start()
    yield server
    server.stop()
