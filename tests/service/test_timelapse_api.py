"""A job across training time over HTTP: conv1 at any epoch, the GIF, the layer statistics; finished runs,
runs without snapshots, bad input, and a job running on a real worker."""

from __future__ import annotations

import io
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models import render
from models.atomic import atomic_write_bytes
from models.runs import RunStore
from models.timelapse import STAT_LAYERS, list_snapshots, load_snapshot
from tests.helpers import add_run, link_copy, start_server
from tests.service.conftest import make_client
from tests.worker.conftest import Stack, job_config, wait_for

ENDPOINTS = ("/filters", "/filters.gif", "/layers", "/layers.png")


@pytest.fixture(scope="module")
def home(trained_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's copy of the trained store (run `tiny`: 1 epoch, so snapshots 0 and 1); tests add runs."""
    return link_copy(trained_home, tmp_path_factory.mktemp("lapse") / "home")


@pytest.fixture(scope="module")
def api(home: Path) -> Iterator[TestClient]:
    """The app over that store, started once for the module."""
    with make_client(home) as c:
        yield c


def image(r: httpx.Response) -> Image.Image:
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(r.content))


def test_filters_at_every_epoch_in_every_format(api: TestClient, home: Path) -> None:
    snaps = {e: load_snapshot(p) for e, p in list_snapshots(home / "runs" / "tiny").items()}
    assert list(snaps) == [0, 1]
    r = api.get("/jobs/tiny/filters")  # the latest
    assert r.headers["x-convlens-epoch"] == "1" and r.headers["x-convlens-epochs"] == "0-1"
    h, w = render.filters_channels_size(snaps[1].shape)
    assert image(r).size == (w, h)
    h, w = render.filters_rgb_size(snaps[0].shape)
    assert image(api.get("/jobs/tiny/filters", params={"epoch": 0, "method": "rgb"})).size == (w, h)

    for e, weight in snaps.items():
        js = api.get("/jobs/tiny/filters", params={"epoch": e, "format": "json"}).json()
        assert js["epoch"] == e and js["epochs"] == [0, 1] and js["shape"] == [64, 3, 7, 7]
        torch.testing.assert_close(torch.tensor(js["values"]), weight)
        npy = api.get("/jobs/tiny/filters", params={"epoch": e, "format": "npy"})
        assert npy.headers["x-convlens-epoch"] == str(e)
        assert np.array_equal(np.load(io.BytesIO(npy.content)), weight.numpy())
    assert not torch.equal(snaps[0], snaps[1])

    diff = api.get("/jobs/tiny/filters", params={"epoch": 1, "diff": 1, "format": "json"}).json()
    torch.testing.assert_close(torch.tensor(diff["values"]), snaps[1] - snaps[0])
    assert diff["diff"] is True
    assert image(api.get("/jobs/tiny/filters", params={"epoch": 1, "diff": 1})).format == "PNG"

    # One colour scale for the run: the epoch with the smaller max|W| looks different from its own-scale picture.
    small = min(snaps, key=lambda e: float(snaps[e].abs().max()))
    own = api.get("/jobs/tiny/filters", params={"epoch": small}).content
    run_scale = api.get("/jobs/tiny/filters", params={"epoch": small, "colours": "run"}).content
    assert image_bytes(own) != image_bytes(run_scale)


def image_bytes(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def test_gif_and_layer_statistics(api: TestClient) -> None:
    r = api.get("/jobs/tiny/filters.gif")
    gif = image(r)
    assert r.headers["content-type"] == "image/gif" and getattr(gif, "n_frames", 1) == 2
    assert r.headers["x-convlens-frames"] == "2"
    assert getattr(image(api.get("/jobs/tiny/filters.gif", params={"method": "rgb"})), "n_frames", 1) == 2

    layers = api.get("/jobs/tiny/layers").json()
    assert layers["status"] == "succeeded" and layers["layers"] == list(STAT_LAYERS)
    assert [e["epoch"] for e in layers["epochs"]] == [0, 1]
    for rec in layers["epochs"]:
        assert set(rec["layers"]) == set(STAT_LAYERS)
        assert all(np.isfinite(v) for stats in rec["layers"].values() for v in stats.values())
    assert layers["epochs"][1]["layers"]["layer4"]["update_ratio"] > 0
    assert image(api.get("/jobs/tiny/layers.png")).format == "PNG"


@pytest.mark.parametrize(
    ("path", "params", "says"),
    [
        ("/filters", {"epoch": -1}, "greater than or equal to 0"),
        ("/filters", {"epoch": 10**12}, "less than or equal to"),
        ("/filters", {"epoch": "last"}, "valid integer"),
        ("/filters", {"method": "pca"}, "'channels' or 'rgb'"),
        ("/filters", {"format": "gif"}, "'png', 'json' or 'npy'"),
        ("/filters", {"scale": 17}, "less than or equal to 16"),
        ("/filters", {"colours": "layer"}, "'epoch' or 'run'"),
        ("/filters.gif", {"max_frames": 1}, "greater than or equal to 2"),
        ("/filters.gif", {"scale": 9}, "less than or equal to 8"),
        ("/filters.gif", {"duration_ms": 5}, "greater than or equal to 20"),
    ],
)
def test_bad_parameters_are_422_saying_what(api: TestClient, path: str, params: dict[str, object], says: str) -> None:
    r = api.get(f"/jobs/tiny{path}", params=params)
    assert r.status_code == 422 and says in json.dumps(r.json()["detail"]), r.text


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"epoch": 2}, "out of range: job tiny has snapshots for epochs 0..1"),
        ({"epoch": 0, "diff": 1}, "can diff epochs 1..1"),
    ],
)
def test_epochs_the_run_does_not_have_are_404_giving_the_range(
    api: TestClient, params: dict[str, object], says: str
) -> None:
    """Well-formed epochs (the schema allows them) that this run has no snapshot for: the run's state, not syntax."""
    r = api.get("/jobs/tiny/filters", params=params)
    assert r.status_code == 404 and says in r.json()["detail"], r.text


def test_unknown_and_malformed_ids(api: TestClient) -> None:
    for path in ENDPOINTS:
        r = api.get(f"/jobs/no-such-job{path}")
        assert r.status_code == 404 and r.json()["detail"] == "no run 'no-such-job'", r.text
        for bad in ("a.b", "-x", "x" * 65):
            r = api.get(f"/jobs/{bad}{path}")
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "run_id"], (bad, r.text)


def test_runs_without_snapshots(api: TestClient, home: Path) -> None:
    store = RunStore(home)
    store.create_run({}, run_id="waiting")  # queued: they come once it trains
    for path in ("/filters", "/filters.gif"):
        r = api.get(f"/jobs/waiting{path}")
        assert r.status_code == 409 and "no conv1 snapshots yet (queued)" in r.json()["detail"], r.text
    assert api.get("/jobs/waiting/layers").json()["epochs"] == []
    assert image(api.get("/jobs/waiting/layers.png")).format == "PNG"  # panels saying "no data yet"

    old = add_run(home, "old")  # trained before snapshots: no snapshots/ and no `layers` records
    shutil.rmtree(old / "snapshots")
    lines = [ln for ln in (old / "metrics.jsonl").read_text().splitlines(True) if '"kind": "layers"' not in ln]
    atomic_write_bytes(old / "metrics.jsonl", "".join(lines).encode())  # a new file: the linked original stays
    for path in ENDPOINTS:
        r = api.get(f"/jobs/old{path}")
        assert r.status_code == 404 and "predates" in r.json()["detail"], (path, r.text)

    store.create_run({}, run_id="broken", status="failed")  # failed before its first step
    r = api.get("/jobs/broken/filters")
    assert r.status_code == 404 and "failed before its first epoch ended" in r.json()["detail"], r.text
    assert api.get("/jobs/tiny/filters").status_code == 200  # the control: the same store serves a trained run


def test_endpoints_while_a_job_runs_on_a_real_worker(tmp_path: Path, synthetic_data: Path) -> None:
    """Queued: 409. Then a real worker trains it, and every endpoint answers from the snapshots so far."""
    home = tmp_path / "home"
    stack = Stack(home, synthetic_data, None, f"t-{uuid.uuid4().hex[:10]}")
    env = {k: v for k, v in stack.env().items() if k.startswith("CONVLENS_")}
    server = start_server(home, synthetic_data, env=env, log_dir=tmp_path, ready_path="/jobs")
    try:
        with server.client() as client:
            assert client.post("/train", json=job_config(epochs=60), params={"run_id": "live"}).status_code == 202
            r = client.get("/jobs/live/filters")
            assert r.status_code == 409 and "no conv1 snapshots yet (queued)" in r.json()["detail"]
            stack.worker()
            wait_for(lambda: len(list_snapshots(home / "runs" / "live")) >= 3, 180, "epochs 0-2 of the job")

            r = client.get("/jobs/live/filters")
            lo, hi = (int(x) for x in r.headers["x-convlens-epochs"].split("-"))
            assert image(r).format == "PNG" and lo == 0 and int(r.headers["x-convlens-epoch"]) == hi >= 2
            assert client.get("/jobs/live/filters", params={"epoch": 0, "format": "npy"}).status_code == 200
            assert client.get("/jobs/live/filters", params={"epoch": 1, "diff": 1}).status_code == 200
            r = client.get("/jobs/live/filters", params={"epoch": 999})
            assert r.status_code == 404 and "snapshots for epochs 0.." in r.json()["detail"]
            gif = client.get("/jobs/live/filters.gif")
            assert getattr(image(gif), "n_frames", 1) == int(gif.headers["x-convlens-frames"]) >= hi + 1
            layers = client.get("/jobs/live/layers").json()
            assert layers["status"] == "running" and [e["epoch"] for e in layers["epochs"]][:2] == [0, 1]
            assert image(client.get("/jobs/live/layers.png")).format == "PNG"
            assert client.get("/jobs/live").json()["status"] == "running"  # all of it answered while it ran
            assert client.delete("/jobs/live").status_code == 202
            wait_for(lambda: client.get("/jobs/live").json()["status"] == "cancelled", 120, "the job to stop")
    finally:
        server.stop()
        stack.close()
