"""GET /visualize: answers equal models/featurevis, results are cached byte for byte and computed once, large
requests answer 202 then 200, the image survives a PNG round trip through /featuremaps, and every bound is a 422."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models import render
from models.checkpoints import load_checkpoint
from models.featurevis import FeatureVis, layer_pre_relu, model_input, visualize
from service.routes import visualize as visualize_route
from service.routes.visualize import Params, prune, read_result, write_result
from tests.helpers import link_copy, png_bytes
from tests.service.conftest import make_client


@pytest.fixture(scope="module")
def vhome(trained_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the trained store: these tests write results into it."""
    return link_copy(trained_home, tmp_path_factory.mktemp("visualize") / "home")


@pytest.fixture(scope="module")
def vclient(vhome: Path, synthetic_data: Path) -> Iterator[TestClient]:
    with make_client(vhome, synthetic_data) as c:
        yield c


def npy(data: bytes) -> np.ndarray:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    assert arr.dtype == np.float32
    return arr


def png_size(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.height, img.width


@pytest.mark.slow
def test_answers_equal_the_models_computation(vclient: TestClient, vhome: Path) -> None:
    q = {"layer": "layer3", "channels": "5,1", "steps": 32, "seed": 3}
    r = vclient.get("/visualize", params={**q, "format": "npy"})
    assert r.status_code == 200, r.text
    assert r.headers["x-convlens-channels"] == "5,1" and r.headers["x-convlens-shape"] == "2,3,32,32"
    images = npy(r.content)
    assert images.min() >= 0 and images.max() <= 1
    model, meta = load_checkpoint(vhome / "runs" / "tiny" / "checkpoints" / "best")
    want = visualize(model, "layer3", [5, 1], meta["mean"], meta["std"], meta["input_size"], steps=32, seed=3)
    np.testing.assert_allclose(images, want.images.numpy(), atol=1e-4)
    body = vclient.get("/visualize", params={**q, "format": "json"}).json()
    assert body["shape"] == [2, 3, 32, 32] and body["channels"] == [5, 1] and body["objective"] == "channel"
    assert body["history_steps"] == [0, 16, 32] and np.array(body["history"]).shape == (3, 2)
    np.testing.assert_allclose(body["objective_values"], want.values.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.array(body["values"], dtype=np.float32), images)
    r = vclient.get("/visualize", params=q)
    assert r.headers["content-type"] == "image/png" and png_size(r.content) == render.grid_size(2, 128, 128)
    r = vclient.get("/visualize", params={**q, "diversity": 2, "format": "npy"})
    assert r.status_code == 200 and npy(r.content).shape == (2, 2, 3, 32, 32)
    r = vclient.get("/visualize", params={**q, "diversity": 2, "scale": 2})
    assert png_size(r.content) == render.grid_size(4, 64, 64)


def test_cache_hit_returns_identical_bytes(vclient: TestClient, vhome: Path, synthetic_data: Path) -> None:
    svc_before = getattr(vclient.app.state, "featurevis", None)  # type: ignore[attr-defined]
    computed = svc_before.computed if svc_before else 0
    q = {"layer": "layer2", "channels": "2,4,6", "objective": "neuron", "steps": 24, "seed": 11}
    first = vclient.get("/visualize", params=q)
    again = vclient.get("/visualize", params=q)
    assert first.status_code == again.status_code == 200
    assert first.headers["x-convlens-cache"] == "miss" and again.headers["x-convlens-cache"] == "hit"
    assert again.content == first.content
    assert vclient.get("/visualize", params={**q, "format": "npy"}).headers["x-convlens-cache"] == "hit"
    assert vclient.app.state.featurevis.computed == computed + 1  # type: ignore[attr-defined]
    assert len(list((vhome / "featurevis").glob("tiny-*/*.safetensors"))) >= 1
    # Another parameter is another result: the seed is part of the key.
    assert vclient.get("/visualize", params={**q, "seed": 12}).content != first.content
    with make_client(vhome, synthetic_data) as fresh:  # a restart serves it from the run store
        r = fresh.get("/visualize", params=q)
        assert r.content == first.content and r.headers["x-convlens-cache"] == "hit"
        assert fresh.app.state.featurevis.computed == 0  # type: ignore[attr-defined]


def test_identical_concurrent_requests_compute_once(vclient: TestClient) -> None:
    q = {"layer": "layer1", "channels": "0,9", "steps": 40, "seed": 21, "format": "npy"}
    before = getattr(vclient.app.state, "featurevis", None)  # type: ignore[attr-defined]
    computed = before.computed if before else 0
    answers: list[Any] = []
    threads = [threading.Thread(target=lambda: answers.append(vclient.get("/visualize", params=q))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert answers[0].content == answers[1].content == answers[2].content
    assert vclient.app.state.featurevis.computed == computed + 1  # type: ignore[attr-defined]


def test_large_requests_answer_202_then_200(vclient: TestClient) -> None:
    q = {"layer": "conv1", "channels": "all", "steps": 160, "seed": 5, "format": "npy"}  # 64 x 160 > 16 x 512
    r = vclient.get("/visualize", params=q)
    assert r.status_code == 202, r.text
    seen = []
    deadline = time.monotonic() + 300
    while r.status_code == 202:
        body = r.json()
        assert body["status"] == "building" and 0 <= body["progress"] <= 1 and "eta_s" in body
        assert r.headers["retry-after"]
        seen.append(body["progress"])
        assert time.monotonic() < deadline, "the visualization was not computed in time"
        time.sleep(0.2)
        r = vclient.get("/visualize", params=q)
    assert r.status_code == 200, r.text
    assert npy(r.content).shape == (64, 3, 32, 32)
    assert seen == sorted(seen)


def test_sixteen_channels_at_512_steps_answer_synchronously(vclient: TestClient) -> None:
    r = vclient.get("/visualize", params={"layer": "conv1", "channels": ",".join(map(str, range(16))), "steps": 512})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_round_trip_through_png_and_featuremaps(vclient: TestClient, vhome: Path) -> None:
    q = {"layer": "layer2", "channels": "3,8", "steps": 64, "seed": 2}
    images = npy(vclient.get("/visualize", params={**q, "format": "npy"}).content)
    body = vclient.get("/visualize", params={**q, "format": "json"}).json()
    model, meta = load_checkpoint(vhome / "runs" / "tiny" / "checkpoints" / "best")
    means = []
    for i, channel in enumerate([3, 8]):
        u8 = np.clip(np.rint(images[i] * 255), 0, 255).astype(np.uint8)  # what PNG can carry
        upload = {"files": [("file", ("x.png", png_bytes(u8.transpose(1, 2, 0)), "image/png"))]}
        r = vclient.post("/featuremaps", params={"layer": "layer2", "format": "npy"}, **upload)
        assert r.status_code == 200, r.text
        maps = npy(r.content)
        with torch.no_grad():  # the same quantized image, evaluated here: /featuremaps is exactly this
            x = model_input(torch.from_numpy(u8).float()[None] / 255, meta["mean"], meta["std"], 32, 32)
            want = torch.relu(layer_pre_relu(model, x, "layer2"))[0]
        np.testing.assert_allclose(maps, want.numpy(), rtol=1e-4, atol=1e-5)
        # Quantizing to 8 bits moves the channel's mean activation by well under 1%.
        assert maps[channel].mean() == pytest.approx(body["activation"][i], rel=0.01)
        means.append(maps[[3, 8]].mean((1, 2)))
    # Negative control: the two images drive their own channels clearly harder than each other's (summed, since on
    # a one-epoch model one channel may answer the other's image almost as well); equal or swapped images fail.
    own, crossed = means[0][0] + means[1][1], means[1][0] + means[0][1]
    assert crossed < 0.9 * own, means


def test_a_channel_the_layer_lacks_is_a_404_naming_the_range(vclient: TestClient) -> None:
    r = vclient.get("/visualize", params={"layer": "layer1", "channels": "64", "steps": 8})
    assert r.status_code == 404 and "0..63" in r.json()["detail"], r.text


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2049}, "steps"),
        ({"diversity": 9}, "diversity"),
        ({"diversity": 1}, "diversity"),
        ({"diversity": -1}, "diversity"),
        ({"channels": "top:4"}, "needs an image"),
        ({"channels": ""}, "channels"),
        ({"channels": "1;2"}, "channels"),
        ({"layer": "layer4", "channels": "all", "diversity": 3}, "channels x diversity"),
        ({"layer": "layer4", "channels": "all", "steps": 1024}, "steps x images"),
        ({"objective": "maximal"}, "objective"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**31}, "seed"),
        ({"scale": 17}, "scale"),
        ({"format": "gif"}, "format"),
        ({"layer": "layer9"}, "valid layers"),
        ({"model": "../etc"}, "model id"),
    ],
)
def test_every_bound_is_a_422_naming_the_field(vclient: TestClient, params: dict[str, Any], needle: str) -> None:
    r = vclient.get("/visualize", params={"steps": 8, **params})
    assert r.status_code == 422, r.text
    assert needle in str(r.json()["detail"])


def test_unknown_model_is_a_404(vclient: TestClient) -> None:
    r = vclient.get("/visualize", params={"model": "no-such-model", "steps": 8})
    assert r.status_code == 404 and "no-such-model" in r.json()["detail"]


def test_the_store_keeps_the_most_recently_used_results(tmp_path: Path) -> None:
    fv = FeatureVis(
        torch.rand(1, 3, 4, 4), [0], "conv1", "channel", 0, 1, 0, torch.ones(1), torch.ones(1), torch.ones(2, 1)
    )
    params = Params("conv1", (0,), "channel", 0, 1, 0)
    for i, name in enumerate("abc"):
        write_result(tmp_path / name, fv)
        os.utime(tmp_path / f"{name}.json", (1000 + i, 1000 + i))
    assert read_result(tmp_path / "a", params) is not None  # a read counts as a use: "b" is now the oldest
    prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors", "c.json", "c.safetensors"]
    (tmp_path / "c.safetensors").write_bytes(b"damaged")
    assert read_result(tmp_path / "c", params) is None  # a damaged result is computed again, not served


def test_too_many_computations_answer_429_and_abandoned_ones_stop(
    vclient: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(visualize_route, "MAX_BUILDS", 1)
    monkeypatch.setattr(visualize_route, "ABANDON_S", 1.0)
    big = {"layer": "layer4", "channels": "all", "steps": 64, "seed": 99, "format": "npy"}  # 512 x 64: background
    assert vclient.get("/visualize", params=big).status_code == 202
    r = vclient.get("/visualize", params={**big, "seed": 98})
    assert r.status_code == 429 and r.headers["retry-after"] and "at once" in r.json()["detail"]
    svc = vclient.app.state.featurevis  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while svc.running():  # nobody polls: it stops within a step of ABANDON_S
        assert time.monotonic() < deadline, "an abandoned computation kept running"
        time.sleep(0.2)
    home = vclient.app.state.settings.home  # type: ignore[attr-defined]
    assert all(json.loads(p.read_text())["seed"] != 99 for p in home.glob("featurevis/*/*.json"))  # nothing stored
    r = vclient.get("/visualize", params=big)  # asking again starts it again
    assert r.status_code == 202 and r.json()["progress"] < 1
    while svc.running():
        time.sleep(0.2)
