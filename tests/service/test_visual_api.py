"""GET /filters, POST /featuremaps, POST /reconstruct, GET /topk: answers equal the models/ math, sizes as promised,
errors name the field, and the top-k index is built in the background (202 + progress) then served."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models import render
from models.checkpoints import load_checkpoint
from models.data import load_cifar, normalize, train_val_split
from models.hooks import count_hooks
from models.resnet import ResNet18
from models.reverse import reconstruct
from models.visual import feature_maps, receptive_field
from service.images import ImageLimits, prepare
from tests.service.conftest import make_client

LIMITS = ImageLimits()


@pytest.fixture(scope="module")
def ref(trained_home: Path) -> tuple[ResNet18, dict[str, Any]]:
    model, meta = load_checkpoint(trained_home / "runs" / "tiny" / "checkpoints" / "best")
    return model, meta


def upload(png: bytes) -> dict[str, Any]:
    return {"files": [("file", ("x.png", png, "image/png"))]}


def png_size(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.height, img.width


def npy(data: bytes) -> np.ndarray:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    assert arr.dtype == np.float32
    return arr


def test_filters_png_json_npy(client: TestClient, ref: tuple[ResNet18, dict[str, Any]]) -> None:
    model, _ = ref
    w = model.conv1.weight.detach()
    r = client.get("/filters")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert png_size(r.content) == render.filters_channels_size(tuple(w.shape))
    r = client.get("/filters", params={"method": "rgb"})
    assert png_size(r.content) == render.filters_rgb_size(tuple(w.shape))
    r = client.get("/filters", params={"format": "npy"})
    np.testing.assert_array_equal(npy(r.content), w.numpy())
    body = client.get("/filters", params={"layer": "layer2.0.conv1", "format": "json"}).json()
    assert body["shape"] == [128, 64, 3, 3] and body["layer"] == "layer2.0.conv1"
    np.testing.assert_allclose(np.array(body["values"]), model.layer2[0].conv1.weight.detach().numpy(), rtol=1e-6)
    r = client.get("/filters", params={"in_channels": "0,2", "format": "npy"})
    np.testing.assert_array_equal(npy(r.content), w[:, [0, 2]].numpy())


def test_filters_of_an_input_channel_the_conv_lacks_is_404(client: TestClient) -> None:
    r = client.get("/filters", params={"in_channels": "7"})  # well formed; conv1 has 3 input channels
    assert r.status_code == 404 and "0..2" in r.json()["detail"], r.text


def test_a_deep_conv_draws_the_panels_that_fit_and_names_them(client: TestClient) -> None:
    r = client.get("/filters", params={"layer": "layer4.1.conv2"})  # 512 x 512 filters: more than a figure holds
    drawn = r.headers["x-convlens-channels"].split(",")
    assert r.status_code == 200 and drawn == [str(i) for i in range(render.MAX_TILES // 512)], r.headers


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"layer": "layer9"}, "valid"),
        ({"layer": "layer2", "method": "rgb"}, "3 input channels"),
        ({"in_channels": "x;y"}, "channels"),
        ({"format": "gif"}, "format"),
        ({"model": "../etc"}, "model id"),
    ],
)
def test_filters_errors_name_the_field(client: TestClient, params: dict[str, str], needle: str) -> None:
    r = client.get("/filters", params=params)
    assert r.status_code == 422, r.text
    assert needle in str(r.json()["detail"])


def test_featuremaps_equal_the_activation(
    client: TestClient, test_pngs: list[bytes], ref: tuple[ResNet18, dict[str, Any]]
) -> None:
    model, meta = ref
    x = prepare(test_pngs[3], meta, LIMITS)
    for layer in ("conv1", "conv3_x", "layer4"):
        want = feature_maps(model, x[0], layer)
        r = client.post("/featuremaps", params={"layer": layer, "format": "npy"}, **upload(test_pngs[3]))
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(npy(r.content), want.numpy(), rtol=1e-5, atol=1e-6)
        r = client.post("/featuremaps", params={"layer": layer}, **upload(test_pngs[3]))
        assert png_size(r.content) == render.activation_grid_size(tuple(want.shape))
    r = client.post(
        "/featuremaps", params={"layer": "layer1", "channels": "top:5", "format": "json"}, **upload(test_pngs[3])
    )
    body = r.json()
    act = feature_maps(model, x[0], "layer1")
    assert body["channels"] == act.flatten(1).amax(1).argsort(descending=True, stable=True)[:5].tolist()
    assert body["shape"] == [5, *act.shape[1:]] and len(body["stats"]["max"]) == 5
    assert r.headers["x-convlens-channels"] == ",".join(map(str, body["channels"]))


def test_reconstruct_equals_the_reverse_network(
    client: TestClient, test_pngs: list[bytes], ref: tuple[ResNet18, dict[str, Any]]
) -> None:
    model, meta = ref
    x = prepare(test_pngs[5], meta, LIMITS)[0]
    cases = [
        {"layer": "conv1", "channels": "all"},
        {"layer": "layer2", "channels": "top:8", "seed": "argmax", "rule": "guided"},
        {"layer": "layer4", "channels": "3,1", "mode": "whole", "shortcut": "residual"},
    ]
    for q in cases:
        want = reconstruct(
            model,
            x,
            q["layer"],
            {"all": "all", "top:8": 8, "3,1": [3, 1]}[q["channels"]],
            q.get("mode", "each"),  # type: ignore[arg-type]
            q.get("seed", "activation"),  # type: ignore[arg-type]
            q.get("rule", "deconvnet"),  # type: ignore[arg-type]
            q.get("shortcut", "sum"),  # type: ignore[arg-type]
        )
        r = client.post("/reconstruct", params={**q, "format": "npy"}, **upload(test_pngs[5]))
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(npy(r.content), want.projections.numpy(), rtol=1e-4, atol=1e-6)
        assert r.headers["x-convlens-channels"] == ",".join(map(str, want.channels))
        r = client.post("/reconstruct", params=q, **upload(test_pngs[5]))
        k = want.projections.shape[0]
        assert png_size(r.content) == render.projection_grid_size(k, 32, 32)
        rows, cols = map(int, r.headers["x-convlens-grid"].split(","))  # the page maps a click to a tile with it
        assert rows * cols >= k + 1 > (rows - 1) * cols and (rows, cols) == render.grid_shape(k + 1)
    body = client.post("/reconstruct", params={"channels": "top:2", "format": "json"}, **upload(test_pngs[5])).json()
    assert body["shape"] == [2, 3, 32, 32] and body["layer"] == "conv1" and len(body["argmax"]) == 2


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"layer": "conv6_x"}, "conv5_x"),
        ({"layer": "layer4", "channels": "600"}, "0..511"),
        ({"channels": "top:0"}, "top:N"),
        ({"mode": "most"}, "mode"),
        ({"rule": "magic"}, "rule"),
        ({"channels": ""}, "channels"),
    ],
)
def test_reconstruct_errors_name_the_field(
    client: TestClient, test_pngs: list[bytes], params: dict[str, str], needle: str
) -> None:
    r = client.post("/reconstruct", params=params, **upload(test_pngs[0]))
    assert r.status_code == 422, r.text
    assert needle in str(r.json()["detail"])


def test_bad_images_and_json_bodies(client: TestClient, test_pngs: list[bytes]) -> None:
    r = client.post("/featuremaps", files=[("file", ("x.png", b"not an image", "image/png"))])
    assert r.status_code == 422 and "image" in r.json()["detail"]
    r = client.post("/featuremaps", files=[("file", ("x.png", b"", "image/png"))])
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = client.post("/featuremaps", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    import base64

    two = {"images": [base64.b64encode(test_pngs[0]).decode()] * 2}
    assert client.post("/reconstruct", json=two).status_code == 413
    one = {"images": [base64.b64encode(test_pngs[0]).decode()]}
    r = client.post("/reconstruct", json=one, params={"format": "npy"})
    assert r.status_code == 200 and npy(r.content).shape == (16, 3, 32, 32)


def test_json_refuses_huge_answers(client: TestClient, test_pngs: list[bytes]) -> None:
    r = client.post(
        "/reconstruct", params={"layer": "layer4", "channels": "all", "format": "json"}, **upload(test_pngs[0])
    )
    assert r.status_code == 422 and "npy" in r.json()["detail"]


def test_hooks_are_released_over_many_requests(client: TestClient, test_pngs: list[bytes]) -> None:
    registry = client.app.state.registry  # type: ignore[attr-defined]
    net = registry.get().model
    before = count_hooks(net)
    for i in range(20):
        assert client.post(
            "/featuremaps", params={"layer": "layer3", "format": "npy"}, **upload(test_pngs[i])
        ).is_success
    assert count_hooks(net) == before == 0


def _wait_topk(client: TestClient, params: dict[str, Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    seen_202 = []
    while time.monotonic() < deadline:
        r = client.get("/topk", params=params)
        if r.status_code != 202:
            return r, seen_202
        body = r.json()
        assert body["status"] == "building" and 0 <= body["progress"] <= 1 and r.headers["retry-after"]
        seen_202.append(body)
        time.sleep(0.1)
    raise AssertionError("the top-k index was not built in time")


def test_topk_builds_in_background_then_serves_the_strongest_images(
    home: Path, synthetic_data: Path, ref: tuple[ResNet18, dict[str, Any]]
) -> None:
    model, meta = ref
    with make_client(home, synthetic_data) as client:
        r = client.get("/topk", params={"layer": "layer3", "channel": 7})
        assert r.status_code == 202, r.text
        r, _ = _wait_topk(client, {"layer": "layer3", "channel": 7, "k": 9})
        assert r.status_code == 200, r.text
        body = r.json()
        hits = body["hits"]
        assert body["k"] == 9 and body["split"].startswith("cifar10 validation")
        # Recompute: these images' channel-7 maxima are the 9 largest over the validation split, in order.
        full = load_cifar(synthetic_data, "cifar10", train=True)
        _, val = train_val_split(full, meta["config"]["val_size"])
        assert val is not None and body["num_images"] == len(val)
        x = normalize(val.images, tuple(meta["mean"]), tuple(meta["std"]))
        from models.hooks import record_activations

        act = record_activations(model, x, ["layer3"])["layer3"][:, 7]
        maxima = act.flatten(1).amax(1)
        want = maxima.argsort(descending=True, stable=True)[:9]
        assert [h["image"] for h in hits] == want.tolist()
        np.testing.assert_allclose([h["value"] for h in hits], maxima[want].numpy(), rtol=1e-5)
        values = [h["value"] for h in hits]
        assert values == sorted(values, reverse=True)
        for h in hits:
            assert h["box"] == list(receptive_field(model, "layer3", h["row"], h["col"], 32, 32))
            assert h["class"] == val.classes[int(val.labels[h["image"]])]
        # The index lies in the run store, so a new app (a restart) serves it at once.
        assert list((home / "topk").glob("tiny-*/index.json"))
    with make_client(home, synthetic_data) as client:
        r = client.get("/topk", params={"layer": "conv4_x", "channel": 7, "k": 3, "format": "png", "tile": 40})
        assert r.status_code == 200 and png_size(r.content) == render.topk_size(3, 40)
        r = client.get("/topk", params={"layer": "layer1", "channel": 2, "k": 2, "images": True})
        assert r.json()["hits"][0]["patch_png"].startswith("data:image/png;base64,")
        r = client.get("/topk", params={"layer": "layer1", "channel": 64})  # well formed, but layer1 has 64
        assert r.status_code == 404 and "0..63" in r.json()["detail"]
        assert client.get("/topk", params={"layer": "layer1", "channel": 512}).status_code == 422  # no layer has


def test_topk_without_the_dataset_is_a_clear_503(home: Path, tmp_path: Path) -> None:
    with make_client(home, tmp_path / "no-data") as client:
        r, seen = _wait_topk(client, {"layer": "layer1"})
        assert r.status_code == 503 and "cifar" in r.json()["detail"].lower(), r.text


def test_visual_endpoints_over_http(server: Any, test_pngs: list[bytes]) -> None:
    import httpx

    r = httpx.post(
        f"{server.url}/reconstruct", params={"channels": "all"}, files=upload(test_pngs[1])["files"], timeout=30
    )
    assert r.status_code == 200 and png_size(r.content) == render.projection_grid_size(64, 32, 32)
    r = httpx.get(f"{server.url}/filters", timeout=30)
    assert r.status_code == 200
