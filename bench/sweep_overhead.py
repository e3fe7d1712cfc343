"""What a sweep costs over submitting its jobs by hand: 8 one-epoch rows on 2 workers, both ways, in turn.

    .venv/bin/python bench/sweep_overhead.py [--rows 8] [--repeats 2] [--train-limit 200]

Starts its own processes on a temporary run store with synthetic data: a private redis-server on a free port,
the API (uvicorn) and two `convlens worker` processes (one torch thread each). Then, alternating so drift hits
both alike: one POST /sweeps with a grid of `--rows` seeds, and the same rows as `--rows` POST /train calls.
Prints, per way and as the ratio sweep / by hand (medians over --repeats):
- submit s: the request(s) until every row is queued;
- makespan s: from the first request until the last row has finished;
- busy s: the rows' own wall times (started -> finished) summed, over the 2 workers: the floor of the makespan;
- overhead s: makespan - busy / workers (queueing, delivery, start-up of each job).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.jobs import JOB, Procs  # noqa: E402
from models.runs import RunStore  # noqa: E402
from models.synthetic import write_synthetic_cifar  # noqa: E402
from tests.helpers import RedisServer, free_port, wait_for  # noqa: E402

WORKERS = 2


def _finished(store: RunStore, ids: list[str]) -> list[dict[str, Any]] | None:
    runs = [store.read_run(r) for r in ids]
    return runs if all(r["status"] in ("succeeded", "failed", "cancelled") for r in runs) else None


def _measure(store: RunStore, ids: list[str], t0: float, submitted: float) -> dict[str, float]:
    runs = wait_for(lambda: _finished(store, ids), 1800, "every row finished", 0.1)
    assert runs is not None
    bad = [r["id"] for r in runs if r["status"] != "succeeded"]
    if bad:
        raise SystemExit(f"rows did not succeed: {bad}")
    busy = sum(r["finished"] - r["started"] for r in runs)
    makespan = max(r["finished"] for r in runs) - t0
    return {"submit s": submitted - t0, "makespan s": makespan, "busy s": busy, "overhead s": makespan - busy / WORKERS}


def by_sweep(url: str, store: RunStore, base: dict[str, Any], seeds: list[int], tag: str) -> dict[str, float]:
    """One POST /sweeps for every row."""
    t0 = time.time()
    r = httpx.post(f"{url}/sweeps", json={"id": tag, "base": base, "grid": {"seed": seeds}}, timeout=60)
    r.raise_for_status()
    return _measure(store, r.json()["run_ids"], t0, time.time())


def by_hand(url: str, store: RunStore, base: dict[str, Any], seeds: list[int], tag: str) -> dict[str, float]:
    """One POST /train per row, one after the other."""
    t0 = time.time()
    ids = []
    for i, seed in enumerate(seeds):
        r = httpx.post(f"{url}/train", json={**base, "seed": seed}, params={"run_id": f"{tag}-{i:02d}"}, timeout=60)
        r.raise_for_status()
        ids.append(r.json()["id"])
    return _measure(store, ids, t0, time.time())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=200, help="training images per row (one epoch each)")
    ns = ap.parse_args()
    base = {**JOB, "epochs": 1, "train_limit": ns.train_limit, "log_every": 10}
    seeds = list(range(1, ns.rows + 1))
    results: dict[str, list[dict[str, float]]] = {"sweep": [], "by hand": []}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        data, home = Path(tmp) / "data", Path(tmp) / "home"
        home.mkdir()
        write_synthetic_cifar(data, "cifar10", n_train=1000, n_test=200)
        redis = RedisServer(free_port()).start()
        procs = Procs(home, data, redis.url)
        procs.env["CONVLENS_TORCH_THREADS"] = "1"
        try:
            url = procs.api()
            for _ in range(WORKERS):
                procs.worker()
            store = RunStore(home)
            by_hand(url, store, base, seeds[:2], "warmup")  # first imports and data loads off the clock
            for i in range(ns.repeats):
                results["sweep"].append(by_sweep(url, store, base, seeds, f"sweep{i}"))
                results["by hand"].append(by_hand(url, store, base, seeds, f"hand{i}"))
        finally:
            procs.close()
            redis.stop()
    med = {way: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for way, rs in results.items()}
    print(f"{ns.rows} one-epoch rows ({ns.train_limit} images) on {WORKERS} workers, median of {ns.repeats}")
    print(f"{'':14}{'sweep':>10}{'by hand':>10}{'ratio':>8}")
    for k in med["sweep"]:
        s, h = med["sweep"][k], med["by hand"][k]
        print(f"{k:14}{s:10.3f}{h:10.3f}{(s / h if h else float('nan')):8.3f}")
    print("command: .venv/bin/python bench/sweep_overhead.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
