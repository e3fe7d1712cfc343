"""The jobs API over real HTTP: uvicorn and a Celery worker as processes, against the real Redis."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from convlens.main import main
from convlens.watch import sse_events
from models.runs import RunStore
from tests.helpers import Server, start_server
from tests.worker.conftest import REDIS_URL, Stack, cleanup_redis, job_config, redis_up, wait_for

Event = tuple[str, dict[str, Any], str | None]
Api = tuple[httpx.Client, Stack]


pytestmark = pytest.mark.slow  # every test here talks to a real server and worker (the module's `api`)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> Iterator[tuple[httpx.Client, Stack]]:
    """The API and one worker sharing a run store and a queue of their own on the real Redis."""
    if not redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379 (.ci/run starts one)")
    home = tmp_path_factory.mktemp("jobs-api")
    stack = Stack(home, synthetic_data, REDIS_URL, f"t-{uuid.uuid4().hex[:10]}")
    server: Server | None = None
    try:
        env = {k: v for k, v in stack.env().items() if k.startswith("CONVLENS_")}
        server = start_server(home, synthetic_data, env=env, ready_path="/jobs")
        stack.worker()
        with server.client() as client:
            yield client, stack
    finally:
        if server:
            server.stop()
        stack.close()
        cleanup_redis(REDIS_URL, stack.queue, stack.home)


def events(client: httpx.Client, rid: str, stop_after: int | None = None, last_id: str | None = None) -> list[Event]:
    """Read /jobs/{rid}/events until its end event (or `stop_after` data events, then hang up)."""
    out: list[Event] = []
    headers = {"Last-Event-ID": last_id} if last_id else {}
    with client.stream("GET", f"/jobs/{rid}/events", headers=headers, timeout=httpx.Timeout(10, read=120)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for name, data, eid in sse_events(r.iter_lines()):
            out.append((name, json.loads(data), eid))
            if name == "end" or (stop_after and sum(e[2] is not None for e in out) >= stop_after):
                break
    return out


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1001}, "epochs"),
        ({"batch_size": 5000}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"arch": "vgg16"}, "arch"),
        ({"dataset": "mnist"}, "dataset"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"schedule": "step"}, "schedule"),
        ({"milestones": [15, 0]}, "milestones"),
        ({"gamma": 2}, "gamma"),
        ({"crop": "maybe"}, "crop"),
        ({"val_size": -1}, "val_size"),
        ({"learning_rate": 0.1}, "learning_rate"),
    ],
)
def test_bad_configs_are_422_naming_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    client, stack = api
    before = len(stack.store.list_runs())
    r = client.post("/train", json=body)
    assert r.status_code == 422, r.text
    assert any(field in e["loc"] or field in e["msg"] for e in r.json()["detail"]), r.json()
    assert len(stack.store.list_runs()) == before  # nothing queued


def test_unknown_job_404_malformed_id_422(api: Api) -> None:
    client, _ = api
    for suffix in ("", "/metrics", "/events", "/curves.png"):
        assert client.get(f"/jobs/no-such-job{suffix}").status_code == 404
        for bad in ("a.b", "-x", "x" * 65, "a%20b"):
            r = client.get(f"/jobs/{bad}{suffix}")
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "run_id"], (bad, r.text)
    assert client.delete("/jobs/no-such-job").status_code == 404
    assert client.delete("/jobs/a.b").status_code == 422
    assert client.post("/train", params={"run_id": "../etc"}, json={}).status_code == 422


def test_job_runs_to_success_with_live_progress(api: Api) -> None:
    client, stack = api
    r = client.post("/train", json=job_config(epochs=2), params={"run_id": "api-ok"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["id"] == "api-ok" and job["status"] == "queued" and job["dispatched"] is True
    assert job["status_url"].endswith("/jobs/api-ok") and job["events_url"].endswith("/jobs/api-ok/events")
    assert client.post("/train", json=job_config(), params={"run_id": "api-ok"}).status_code == 409

    first = events(client, "api-ok", stop_after=3)  # hang up mid-job ...
    last_id = [e[2] for e in first if e[2]][-1]
    rest = events(client, "api-ok", last_id=last_id)  # ... and resume where we left
    data = [e for e in first + rest if e[2] is not None]
    ids = [e[2] for e in data]
    assert len(ids) == len(set(ids)), ids  # no duplicates across the reconnect
    assert [e[1]["step"] for e in data if e[0] == "step"] == [1, 2, 3, 4]  # in order, none missing
    assert [e[1]["epoch"] for e in data if e[0] == "epoch"] == [1, 2] and [e[0] for e in data][-1] == "final"
    assert any(e[0] == "status" and e[1]["status"] == "running" for e in first)
    end = rest[-1]
    assert end[0] == "end" and end[1]["status"] == "succeeded" and end[1]["metrics"]["test_acc"] > 0

    run = client.get(job["status_url"]).json()
    assert run["status"] == "succeeded" and run["attempts"] == 1 and run["links"]["curves_url"]
    best = stack.home / run["best_checkpoint"]
    assert best.with_suffix(".safetensors").is_file() and (best.parent / "state.pt").is_file()
    assert "api-ok" in client.get("/models").text  # the registry serves it, no restart

    pages, after = [], -1
    while True:
        page = client.get("/jobs/api-ok/metrics", params={"after_step": after, "limit": 2}).json()
        pages.append(page["records"])
        after = page["next_after_step"]
        if not page["has_more"]:
            break
    flat = [rec for p in pages for rec in p]
    assert flat == stack.store.metrics("api-ok").read() and len(pages) >= 2
    assert [r["epoch"] for r in client.get("/jobs/api-ok/metrics", params={"kind": "epoch"}).json()["records"]] == [
        1,
        2,
    ]

    table = client.get("/jobs", params={"status": "succeeded", "sort": "accuracy"}).json()
    row = next(j for j in table["jobs"] if j["id"] == "api-ok")
    assert row["config"]["batch_size"] == 50 and row["config"]["milestones"] == [] and row["config"]["crop"] is True
    assert row["test_acc"] == run["metrics"]["test_acc"] and row["best_val_acc"] is not None
    assert row["accuracy"] == row["test_acc"] and row["final_test_acc"] is not None
    png = client.get("/jobs/api-ok/curves.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert client.delete("/jobs/api-ok").status_code == 409  # finished: nothing to cancel


def test_cancel_queued_and_running_jobs(api: Api) -> None:
    client, stack = api
    running = client.post("/train", json=job_config(epochs=3)).json()["id"]
    queued = client.post("/train", json=job_config(epochs=1)).json()["id"]  # behind it: one job per worker

    # A queued job's stream keeps alive with comments, then ends when it is cancelled.
    lines: list[str] = []
    with client.stream("GET", f"/jobs/{queued}/events", params={"heartbeat": 0.5}) as r:
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith(": ping") and sum(x.startswith(": ping") for x in lines) == 1:
                cancel = client.delete(f"/jobs/{queued}")
                assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"
            if line.startswith("data: ") and lines[-2] == "event: end":
                break
    assert json.loads(lines[-1][len("data: ") :])["status"] == "cancelled"

    wait_for(lambda: client.get(f"/jobs/{running}/metrics", params={"kind": "epoch"}).json()["records"], 180, "epoch 1")
    t0 = time.monotonic()
    r = client.delete(f"/jobs/{running}")
    assert r.status_code == 202 and r.json() == {"id": running, "status": "running", "cancel_requested": True}
    wait_for(lambda: client.get(f"/jobs/{running}").json()["status"] == "cancelled", 30, "the cancel")
    took = time.monotonic() - t0
    assert took < 15, took  # stops after the step in progress
    run = client.get(f"/jobs/{running}").json()
    ckpts = stack.store.checkpoints_dir(running)
    best = (stack.home / run["best_checkpoint"]).with_suffix(".safetensors")
    assert (ckpts / "epoch-0001.safetensors").is_file() and best.is_file()  # the checkpoint is kept
    assert client.delete(f"/jobs/{running}").json()["status"] == "cancelled"  # again: idempotent

    # The worker then takes the cancelled job's message and drops it untouched.
    wait_for(lambda: f"convlens.train[{queued}] succeeded" in stack.workers[0].log(), 60, "the dropped delivery")
    assert RunStore(stack.home).read_run(queued)["attempts"] == 0


def test_nothing_returns_500(api: Api) -> None:
    client, stack = api
    rid = stack.store.create_run(job_config(), status="cancelled")  # a job with no metrics at all
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/jobs", {"params": {"status": "bogus"}}),
        ("GET", "/jobs", {"params": {"sort": "bogus"}}),
        ("GET", "/jobs", {"params": {"limit": 0}}),
        ("GET", "/jobs", {"params": {"limit": 10**9, "offset": -1}}),
        ("GET", "/jobs", {"params": {"status": ["queued", "failed"], "sort": "oldest"}}),
        ("GET", f"/jobs/{rid}/metrics", {"params": {"after_step": -5}}),
        ("GET", f"/jobs/{rid}/metrics", {"params": {"limit": 0}}),
        ("GET", f"/jobs/{rid}/metrics", {"params": {"kind": "bogus"}}),
        ("GET", f"/jobs/{rid}/metrics", {"params": {"after_step": "x"}}),
        ("GET", f"/jobs/{rid}/events", {"params": {"heartbeat": 0}}),
        ("GET", f"/jobs/{rid}/events", {"headers": {"Last-Event-ID": "garbage"}}),
        ("GET", f"/jobs/{rid}/events", {"headers": {"Last-Event-ID": "99999999999999999999"}}),
        ("GET", f"/jobs/{rid}/curves.png", {}),
        ("GET", f"/jobs/{rid}", {}),
        ("POST", "/train", {"content": b"not json", "headers": {"content-type": "application/json"}}),
        ("POST", "/train", {"json": [1, 2]}),
        ("POST", "/train", {"json": {"epochs": "many", "milestones": "x"}}),
        ("POST", "/train", {"json": {"lr": 1e308, "batch_size": 2**62}}),
        ("DELETE", "/jobs", {}),
    ]
    for method, path, kw in requests:
        r = client.request(method, path, **kw)
        assert r.status_code < 500, (method, path, kw, r.status_code, r.text)
    assert client.get(f"/jobs/{rid}/curves.png").content[:4] == b"\x89PNG"


def test_cli_submit_and_watch(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    client, stack = api
    argv = ["submit", "--url", str(client.base_url), "--run-id", "cli-job", "--watch", "--epochs", "1"]
    argv += ["--batch-size", "50", "--train-limit", "100", "--val-size", "100", "--log-every", "1", "--milestones"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert '"id": "cli-job"' in out and '"status": "succeeded"' in out
    assert main(["watch", "cli-job", "--url", str(client.base_url)]) == 0  # a finished job: backlog, then end
    assert main(["submit", "--url", str(client.base_url), "--epochs", "0"]) == 2  # refused before sending
    assert main(["watch", "no-such-job", "--url", str(client.base_url)]) == 2
