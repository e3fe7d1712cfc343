"""Training jobs through the queue, with each broker: submit-to-running latency, progress rate, kill-to-resume.

    .venv/bin/python bench/jobs.py [--brokers embedded redis] [--jobs 3]

Starts its own processes on a temporary run store with synthetic data: the API (uvicorn), a Celery worker,
and for `redis` a private redis-server on a free port. Prints, per broker:
- submit -> running: POST /train until run.json says running (and until the first step is logged), idle
  worker, median of --jobs small jobs;
- progress: run.json heartbeats and Celery PROGRESS updates per second during training, and how long a
  logged step takes to reach an SSE client (median / p95);
- kill -> resume: SIGKILL the worker after epoch 1, start a new one at once; seconds until it is ready,
  the job is running again, and the next step is logged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convlens.watch import sse_events  # noqa: E402
from models.runs import RunStore  # noqa: E402
from models.synthetic import write_synthetic_cifar  # noqa: E402
from tests.helpers import RedisServer, answers, free_port, wait_for  # noqa: E402

JOB = {"batch_size": 50, "val_size": 100, "milestones": [], "log_every": 1, "keep_last": 10}


class Procs:
    """The processes of one broker setup, stopped by PID at the end."""

    def __init__(self, home: Path, data: Path, broker: str | None) -> None:
        self.home, self.procs, self.worker_n = home, list[subprocess.Popen[bytes]](), 0
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLENS_")}
        self.env |= {"CONVLENS_HOME": str(home), "CONVLENS_DATA_DIR": str(data), "CONVLENS_DEVICE": "cpu"}
        self.env |= {"CONVLENS_TENSORBOARD": "false", "PYTHONPATH": str(ROOT)}
        if broker:
            self.env["CONVLENS_BROKER_URL"] = broker

    def spawn(self, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.home / log).open("ab") as f:
            p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def api(self) -> str:
        port = free_port()
        self.spawn(
            [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--port", str(port)], "api.log"
        )
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(url + "/jobs"), 120, "the API", 0.2)
        return url

    def worker(self) -> tuple[subprocess.Popen[bytes], float]:
        """A new worker; returns it and the seconds until it said ready."""
        self.worker_n += 1
        log = self.home / f"worker-{self.worker_n}.log"
        t0 = time.monotonic()
        p = self.spawn([sys.executable, "-m", "convlens", "worker", "-n", f"b{self.worker_n}@%h"], log.name)
        wait_for(lambda: log.exists() and b" ready." in log.read_bytes(), 120, f"worker {self.worker_n} ready", 0.05)
        return p, time.monotonic() - t0

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


def _one_job(url: str, store: RunStore) -> tuple[float, float]:
    """Seconds from POST /train to running, and to the first logged step, of a one-step job."""
    t0 = time.monotonic()
    rid = httpx.post(f"{url}/train", json={**JOB, "epochs": 1, "train_limit": 50}, timeout=30).json()["id"]
    wait_for(lambda: store.read_run(rid)["status"] != "queued", 300, f"job {rid} to start", 0.01)
    running = time.monotonic() - t0
    wait_for(lambda: store.metrics(rid).read(), 300, f"job {rid}'s first step", 0.01)
    first_step = time.monotonic() - t0
    wait_for(lambda: store.read_run(rid)["status"] == "succeeded", 300, f"job {rid} to succeed", 0.1)
    return running, first_step


def submit_latency(url: str, store: RunStore, n: int) -> dict[str, float]:
    """Medians over n one-step jobs, each sent to an idle worker."""
    running, first_step = zip(*(_one_job(url, store) for _ in range(n)), strict=True)
    return {"submit->running s": statistics.median(running), "submit->first step s": statistics.median(first_step)}


def progress_rates(url: str, store: RunStore, broker: str | None, home: Path) -> dict[str, float]:
    """Heartbeats and PROGRESS updates per second while training; step-to-SSE-client latency."""
    from jobqueue.app import make_celery
    from worker.settings import WorkerSettings

    results = make_celery(WorkerSettings(broker_url=broker, home=home))
    rid = httpx.post(f"{url}/train", json={**JOB, "epochs": 2, "train_limit": 200}, timeout=30).json()["id"]
    delays: list[float] = []

    def follow() -> None:
        with httpx.stream("GET", f"{url}/jobs/{rid}/events", timeout=httpx.Timeout(10, read=300)) as r:
            for event, data, _ in sse_events(r.iter_lines()):
                if event == "step":
                    delays.append(time.time() - json.loads(data)["time"])
                if event == "end":
                    return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    wait_for(lambda: store.read_run(rid)["status"] == "running", 300, f"job {rid} to run", 0.01)
    beats, progress, t0 = set(), set(), time.monotonic()
    while store.read_run(rid)["status"] == "running":
        beats.add(store.read_run(rid).get("heartbeat"))
        info = results.AsyncResult(rid).info
        if isinstance(info, dict):
            progress.add(json.dumps(info, sort_keys=True))  # each distinct report (train, eval, epoch, test)
        time.sleep(0.05)
    span = time.monotonic() - t0
    reader.join(30)
    steps = [r for r in store.metrics(rid).read() if r["kind"] == "step"]
    q = statistics.quantiles(delays, n=20) if len(delays) >= 2 else [float("nan")] * 19
    return {
        "steps logged /s": len(steps) / span,
        "run.json heartbeats /s": len(beats) / span,
        "PROGRESS updates /s": len(progress) / span,
        "step->SSE median s": statistics.median(delays) if delays else float("nan"),
        "step->SSE p95 s": q[18],
    }


def kill_resume(url: str, procs: Procs, store: RunStore, worker: subprocess.Popen[bytes]) -> dict[str, float]:
    """SIGKILL after epoch 1, a new worker at once: seconds to ready, to running again, to the next step."""
    rid = httpx.post(f"{url}/train", json={**JOB, "epochs": 3, "train_limit": 100}, timeout=30).json()["id"]
    wait_for(lambda: any(r["kind"] == "epoch" for r in store.metrics(rid).read()), 300, "epoch 1", 0.05)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    t0 = time.monotonic()
    last_step = max(r["step"] for r in store.metrics(rid).read())
    _, ready = procs.worker()
    wait_for(
        lambda: store.read_run(rid)["attempts"] == 2 and store.read_run(rid)["status"] == "running",
        300,
        "the second attempt to run",
        0.01,
    )
    running = time.monotonic() - t0
    wait_for(lambda: any(r["step"] > last_step for r in store.metrics(rid).read()), 300, "the next step", 0.01)
    stepped = time.monotonic() - t0
    wait_for(lambda: store.read_run(rid)["status"] == "succeeded", 300, "the resumed job to succeed", 0.1)
    return {"kill->worker ready s": ready, "kill->running again s": running, "kill->next step s": stepped}


def bench(broker_name: str, jobs: int, tmp: Path, data: Path) -> dict[str, float]:
    home = tmp / broker_name
    home.mkdir()
    redis = RedisServer(free_port()).start() if broker_name == "redis" else None
    broker = redis.url if redis else None
    procs = Procs(home, data, broker)
    try:
        url = procs.api()
        worker, ready = procs.worker()
        store = RunStore(home)
        out = {"worker start -> ready s": ready}
        out |= submit_latency(url, store, jobs)
        out |= progress_rates(url, store, broker, home)
        out |= kill_resume(url, procs, store, worker)
        return out
    finally:
        procs.close()
        if redis:
            redis.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", nargs="+", default=["embedded", "redis"], choices=["embedded", "redis"])
    ap.add_argument("--jobs", type=int, default=3, help="small jobs for the submit latency median")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        data = Path(tmp) / "data"
        write_synthetic_cifar(data, "cifar10", n_train=1000, n_test=200)
        rows = {b: bench(b, ns.jobs, Path(tmp), data) for b in ns.brokers}
    keys = list(next(iter(rows.values())))
    print(f"{'':28}" + "".join(f"{b:>12}" for b in rows))
    for k in keys:
        print(f"{k:28}" + "".join(f"{rows[b][k]:12.3f}" for b in rows))


if __name__ == "__main__":
    main()
