"""Sweeps and /compare through the API, with real workers: the embedded file queue end to end, then two
`convlens worker` processes on Redis sharing a sweep (no row run twice) and a sweep cancelled mid-run."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models.runs import RunStore
from service.sweeps_view import sweep_row
from tests.helpers import REDIS_URL, redis_up, wait_for
from tests.service.conftest import make_client
from tests.service.test_compare_async import compared
from tests.worker.conftest import Stack, Worker, cleanup_redis, epoch_checkpointed, epochs_logged, job_config

Api = tuple[TestClient, Stack]


def _api(stack: Stack) -> TestClient:
    return make_client(stack.home, stack.data, broker_url=stack.broker_url, queue=stack.queue)


def _finished(client: TestClient, sid: str, want: set[str] | None = None) -> dict[str, Any] | None:
    table = client.get(f"/sweeps/{sid}").json()
    statuses = {r["status"] for r in table["rows"]}
    return table if statuses <= (want or {"succeeded", "failed", "cancelled"}) else None


def wait_done(client: TestClient, sid: str, want: set[str] | None = None, timeout: float = 240) -> dict[str, Any]:
    """The sweep's table once every row is in one of `want` (default: any finished status)."""
    table = wait_for(lambda: _finished(client, sid, want), timeout, f"sweep {sid} rows all {want or 'finished'}", 0.3)
    assert table is not None
    return table


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> Iterator[Api]:
    """The API (in process) and one worker on the embedded file queue, sharing a run store."""
    stack = Stack(tmp_path_factory.mktemp("sweeps-embedded"), synthetic_data, None, f"t-{uuid.uuid4().hex[:10]}")
    try:
        stack.worker()
        with _api(stack) as client:
            yield client, stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> Iterator[Api]:
    """Two `convlens worker` processes (one torch thread each) on a queue of their own on the real Redis."""
    if not redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379 (.ci/run starts one)")
    stack = Stack(tmp_path_factory.mktemp("sweeps-redis"), synthetic_data, REDIS_URL, f"t-{uuid.uuid4().hex[:10]}")
    try:
        for i in range(2):
            stack.workers.append(Worker(stack.env(), stack.home / f"worker-{i}.log", f"w{i}-{stack.queue}"))
        with ThreadPoolExecutor(2) as pool:  # both start at once: each spends seconds importing torch
            list(pool.map(lambda w: w.start(cli=True), stack.workers))
        with _api(stack) as client:
            yield client, stack
    finally:
        stack.close()
        cleanup_redis(REDIS_URL, stack.queue, stack.home)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"grid": {"learning_rate": [0.1]}}, ["body", "grid", "learning_rate"]),
        ({"grid": {"lr": []}}, ["body", "grid", "lr"]),
        ({"grid": {"batch_size": [50, 5000]}}, ["body", "row", 1, "batch_size"]),
        ({"grid": {"milestones": [[2, 0]]}}, ["body", "row", 0, "milestones.1"]),
        ({"grid": {"seed": list(range(9)), "lr": [0.1] * 8}}, ["body", "grid"]),
        ({"rows": [{"epochs": 0}]}, ["body", "row", 0, "epochs"]),
        ({"preset": "seed-table3"}, ["body", "preset"]),
        ({"id": "../x", "grid": {"seed": [1]}}, ["body", "id"]),
    ],
)
def test_bad_sweeps_are_422_naming_it_and_queue_nothing(tmp_path: Path, body: dict[str, Any], loc: list[Any]) -> None:
    with make_client(tmp_path / "home", queue="t-bad") as client:
        r = client.post("/sweeps", json=body)
        assert r.status_code == 422, r.text
        assert [e["loc"][: len(loc)] for e in r.json()["detail"]][0] == loc, r.json()
    assert RunStore(tmp_path / "home").list_runs() == []
    assert not (tmp_path / "home" / "sweeps").exists()
    assert not list((tmp_path / "home" / "queue" / "messages").glob("*.msg"))  # nothing sent


def test_a_sweep_whose_run_ids_exist_is_409_and_writes_nothing(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "home")
    store.create_run({}, run_id="clash-01")
    with make_client(tmp_path / "home", queue="t-clash") as client:
        r = client.post("/sweeps", json={"id": "clash", "grid": {"seed": [1, 2]}})
        assert r.status_code == 409 and "clash-01" in r.json()["detail"], r.text
        assert client.get("/sweeps/clash").status_code == 404
    assert [run["id"] for run in store.list_runs()] == ["clash-01"]


@pytest.fixture(scope="module")
def emb(embedded: Api) -> tuple[Api, Any]:
    """The sweep `emb` (three rows, one on CIFAR-100) posted once, for every test that reads it, in any order."""
    rows = [{"seed": 1}, {"seed": 2}, {"dataset": "cifar100"}]
    return embedded, embedded[0].post("/sweeps", json={"id": "emb", "base": job_config(epochs=2), "rows": rows})


@pytest.mark.slow
def test_sweep_end_to_end_on_the_embedded_queue(emb: tuple[Api, Any]) -> None:
    (client, stack), r = emb
    assert r.status_code == 202, r.text
    assert r.json()["run_ids"] == ["emb-00", "emb-01", "emb-02"] and r.json()["dispatched"] is True
    assert client.post("/sweeps", json={"id": "emb", "grid": {"seed": [1]}}).status_code == 409
    table = wait_done(client, "emb")
    assert table["counts"] == {"succeeded": 3} and table["progress"] == 1.0
    assert table["varying"] == ["seed", "dataset"]
    row = table["rows"][1]
    assert row["values"] == {"seed": 2} and row["attempts"] == 1 and row["worker"].startswith("w0-")
    run = stack.store.read_run("emb-01")
    assert row["test_acc"] == run["metrics"]["test_acc"] and row["final_test_acc"] == run["metrics"]["final_test_acc"]
    epochs = [r for r in stack.store.metrics("emb-01").read() if r.get("kind") == "epoch"]
    assert row["train_acc"] == epochs[-1]["train_acc"] and row["best_epoch"] in (1, 2) and row["best_val_acc"] > 0
    assert row["wall_s"] > 0 and run["config"]["seed"] == 2 and run["sweep"] == "emb"
    listed = client.get("/sweeps").json()
    assert listed["total"] == 1 and listed["sweeps"][0]["counts"] == {"succeeded": 3}
    for png in ("table.png", "curves.png"):
        got = client.get(f"/sweeps/emb/{png}")
        assert got.status_code == 200 and got.content[:4] == b"\x89PNG", png
    assert client.get("/sweeps/nope").status_code == 404 and client.get("/sweeps/nope/table.png").status_code == 404
    assert client.get("/sweeps/a.b").status_code == 422 and client.delete("/sweeps/nope").status_code == 404
    done = client.delete("/sweeps/emb")
    assert done.status_code == 200 and sorted(done.json()["finished"]) == ["emb-00", "emb-01", "emb-02"]


@pytest.mark.slow
def test_compare_two_rows_of_a_sweep(emb: tuple[Api, Any]) -> None:
    (client, stack), _ = emb
    wait_done(client, "emb")
    first = client.get("/compare", params={"models": "emb-00,emb-01", "split": "val"})
    assert first.status_code == 202 and 0 <= first.json()["progress"] <= 1, first.text  # computed in the background
    r, _ = compared(client, "emb-00,emb-01", "val")
    assert r.status_code == 200, r.text
    rep = r.json()
    t, n = rep["table"], rep["n"]
    assert n == 100 and sum(t.values()) == n  # val_size 100 held out by both
    assert rep["accuracy"]["a"] == (t["both_right"] + t["a_right_b_wrong"]) / n
    assert rep["accuracy"]["b"] == (t["both_right"] + t["a_wrong_b_right"]) / n
    assert t["both_right"] / n <= rep["agreement"] <= 1 - (t["a_right_b_wrong"] + t["a_wrong_b_right"]) / n
    f = rep["filters"]
    assert sorted(f["b_for_a"]) == list(range(64)) and len(f["similarity"]) == 64
    assert f["mean_similarity"] >= f["unmatched_mean_similarity"]  # the assignment never does worse than identity
    cached = list((stack.home / "compare").glob("*-val.json"))
    assert len(cached) == 1
    assert client.get("/compare", params={"models": "emb-00,emb-01"}).json() == rep  # served from the cache
    same = compared(client, "emb-00,emb-00", "test")[0].json()
    assert same["agreement"] == 1.0 and same["n"] == 200 and min(same["filters"]["similarity"]) > 0.999
    png = client.get("/compare", params={"models": "emb-00,emb-01", "format": "png"})  # the cached report's figure
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert client.get("/compare", params={"models": "emb-00,emb-02"}).status_code == 422  # cifar10 vs cifar100
    assert client.get("/compare", params={"models": "emb-00,nope"}).status_code == 404
    for bad in ("emb-00", "emb-00,emb-01,emb-02", "emb-00,../x", ","):
        r = client.get("/compare", params={"models": bad})
        assert r.status_code == 422 and r.json()["detail"], bad


def _trained(stack: Stack, rid: str) -> int:
    """How many times any worker's trainer started on the run `rid` (its log's "training on ..." line). A second
    delivery of a message (the reconciler may re-send a row a worker has fetched but not yet marked running) is
    logged as taken and then dropped by the lease: it never reaches the trainer."""
    pattern = rf'"msg": "training on [^"]*", [^\n]*"task_id": "{re.escape(rid)}"'
    return sum(len(re.findall(pattern, w.log())) for w in stack.workers)


@pytest.mark.slow
def test_two_workers_share_a_sweep_and_no_row_runs_twice(two_workers: Api) -> None:
    client, stack = two_workers
    r = client.post("/sweeps", json={"id": "par", "base": job_config(epochs=1), "grid": {"seed": [1, 2, 3, 4]}})
    assert r.status_code == 202, r.text
    table = wait_done(client, "par")
    assert table["counts"] == {"succeeded": 4}
    nodes = {row["worker"].split("@")[0] for row in table["rows"]}
    assert nodes == {f"w0-{stack.queue}", f"w1-{stack.queue}"}, nodes  # both workers trained rows
    for row in table["rows"]:
        assert row["attempts"] == 1 and _trained(stack, row["id"]) == 1, (row, [w.log()[-2000:] for w in stack.workers])
        assert len([r for r in stack.store.metrics(row["id"]).read() if r.get("kind") == "final"]) == 1


@pytest.mark.slow
def test_cancel_a_sweep_mid_run(two_workers: Api) -> None:
    client, stack = two_workers
    r = client.post("/sweeps", json={"id": "cx", "base": job_config(epochs=500), "grid": {"seed": [1, 2, 3, 4]}})
    assert r.status_code == 202, r.text

    def two_running() -> bool:
        rows = client.get("/sweeps/cx").json()["rows"]
        return sum(row["status"] == "running" and (row["epoch"] or 0) >= 1 for row in rows) == 2

    wait_for(two_running, 120, "both workers training a row of the sweep", 0.3)
    answer = client.delete("/sweeps/cx")
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert len(body["stopping"]) == 2 and len(body["cancelled"]) == 2 and body["finished"] == []
    table = wait_done(client, "cx", {"cancelled"}, 120)
    assert all(row["cancel_requested"] for row in table["rows"])
    for rid in body["cancelled"]:  # queued when cancelled: never started by anyone
        assert stack.store.read_run(rid)["attempts"] == 0 and _trained(stack, rid) == 0
    for rid in body["stopping"]:
        assert _trained(stack, rid) == 1 and stack.store.read_run(rid)["attempts"] == 1
    again = client.delete("/sweeps/cx")
    assert again.status_code == 200 and sorted(again.json()["cancelled"]) == sorted(r.json()["run_ids"])


@pytest.mark.slow
def test_a_worker_killed_mid_row_leaves_its_row_to_the_other(two_workers: Api) -> None:
    client, stack = two_workers
    r = client.post("/sweeps", json={"id": "kill", "base": job_config(epochs=3), "grid": {"seed": [1, 2]}})
    assert r.status_code == 202, r.text

    def victim() -> tuple[str, Worker] | None:
        """A row past its first checkpoint while the other row also trains: the worker to kill, and its row."""
        rows = client.get("/sweeps/kill").json()["rows"]
        if not all(row["status"] == "running" and row["worker"] for row in rows):
            return None
        for row in rows:
            if epoch_checkpointed(stack.store, row["id"], 1):
                w = next(w for w in stack.workers if row["worker"].startswith(w.name + "@"))
                return row["id"], w
        return None

    found = wait_for(victim, 120, "both rows training, one past epoch 1", 0.1)
    assert found is not None
    rid, dead = found
    dead.kill()
    table = wait_done(client, "kill", timeout=180)
    assert table["counts"] == {"succeeded": 2}, table
    row = next(row for row in table["rows"] if row["id"] == rid)
    assert row["attempts"] == 2 and not row["worker"].startswith(dead.name + "@")  # resumed by the other worker
    assert epochs_logged(stack.store, rid) == [1, 2, 3]  # resumed from its checkpoint, no epoch twice


def test_a_row_handed_back_to_the_queue_stops_its_clock(tmp_path: Path) -> None:
    """Wall time runs from the first start to the end, to now while running, and stops when a stopped worker hands
    the row back (queued again: it is not running, so its time must not grow)."""
    store = RunStore(tmp_path)
    rid = store.create_run(job_config(), run_id="clock-00")
    t0 = time.time() - 100
    store.update_run(rid, status="running", started=t0)
    assert sweep_row(store, 0, {"id": rid}).wall_s == pytest.approx(100, abs=5)  # running: to now
    store.update_run(rid, status="queued", progress={"phase": "interrupted"})  # handed back now
    handed_back = store.read_run(rid)["updated"]
    time.sleep(1.1)
    row = sweep_row(store, 0, {"id": rid})
    assert row.status == "queued" and row.wall_s == pytest.approx(handed_back - t0, abs=0.01)
    store.update_run(rid, status="succeeded", finished=t0 + 60)
    assert sweep_row(store, 0, {"id": rid}).wall_s == pytest.approx(60)
