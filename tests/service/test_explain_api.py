"""POST /explain: heatmaps equal models.explain's on the same tensor, formats, and errors naming the field."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models.checkpoints import load_checkpoint
from models.explain import explain
from models.resnet import ResNet18
from service.images import ImageLimits, prepare


@pytest.fixture(scope="module")
def ref(trained_home: Path) -> tuple[ResNet18, dict[str, Any]]:
    return load_checkpoint(trained_home / "runs" / "tiny" / "checkpoints" / "best")


def upload(png: bytes) -> dict[str, Any]:
    return {"files": [("file", ("x.png", png, "image/png"))]}


def test_several_methods_equal_the_library(
    client: TestClient, test_pngs: list[bytes], ref: tuple[ResNet18, dict[str, Any]]
) -> None:
    model, meta = ref
    x = prepare(test_pngs[2], meta, ImageLimits())
    params = {"occlusion": {"patch": 8, "stride": 4}, "integrated_gradients": {"steps": 8}}
    methods = ["gradcam", "saliency", "occlusion", "integrated_gradients", "guided_backprop"]
    want = explain(model, x, methods, None, "layer3", params, meta["mean"], meta["std"])
    q = {
        "method": ",".join(methods),
        "layer": "conv4_x",
        "occlusion.patch": 8,
        "occlusion.stride": 4,
        "ig.steps": 8,
        "format": "npy",
    }
    r = client.post("/explain", params=q, **upload(test_pngs[2]))
    assert r.status_code == 200, r.text
    got = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert got.dtype == np.float32 and got.shape == (5, 32, 32)
    assert r.headers["x-convlens-methods"] == ",".join(methods)
    for i, m in enumerate(methods):
        np.testing.assert_allclose(got[i], want[m].heatmap[0].numpy(), rtol=1e-4, atol=1e-6, err_msg=m)
    body = client.post("/explain", params={**q, "format": "json"}, **upload(test_pngs[2])).json()
    probs = torch.softmax(model(x), 1)[0].detach()
    predicted = int(probs.argmax())
    assert body["target"] == predicted == body["predicted"]["index"]
    assert body["predicted"]["probability"] == pytest.approx(float(probs[predicted]), rel=1e-5)
    assert body["target_probability"] == pytest.approx(float(probs[predicted]), rel=1e-5)
    assert body["methods"]["occlusion"]["params"]["patch"] == 8
    assert body["methods"]["gradcam"]["layer"] == "layer3"


def test_target_by_name_and_index(client: TestClient, test_pngs: list[bytes], ref: Any) -> None:
    model, meta = ref
    x = prepare(test_pngs[4], meta, ImageLimits())
    # The default layer for the seed stem at 32x32 is layer3 (its layer4 is 1x1).
    want = explain(model, x, ["gradcam"], 3, "layer3", None, meta["mean"], meta["std"])["gradcam"].heatmap[0]
    name = meta["classes"][3]
    for target in ("3", name, name.upper()):
        r = client.post("/explain", params={"target": target, "format": "npy"}, **upload(test_pngs[4]))
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.load(io.BytesIO(r.content))[0], want.numpy(), rtol=1e-4, atol=1e-6)
        assert r.headers["x-convlens-target"] == name


def test_png_views_have_the_promised_sizes(client: TestClient, test_pngs: list[bytes]) -> None:
    def size(r: Any) -> tuple[int, int]:
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        img = Image.open(io.BytesIO(r.content))
        return img.width, img.height

    assert size(client.post("/explain", params={"view": "overlay", "size": 96}, **upload(test_pngs[0]))) == (96, 96)
    assert size(client.post("/explain", params={"view": "heatmap"}, **upload(test_pngs[0]))) == (128, 128)
    w, h = size(client.post("/explain", params={"method": "all"}, **upload(test_pngs[0])))
    assert w > 10 * 128 and h > 2 * 128  # the input and nine methods side by side, overlay above heatmap


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"method": "lime"}, "unknown method"),
        ({"method": ""}, "method"),
        ({"target": "zebra"}, "not a class"),
        ({"target": "10"}, "0..9"),
        ({"layer": "layer7"}, "valid layers"),
        ({"method": "occlusion", "occlusion.patch": 0}, "occlusion.patch"),
        ({"method": "occlusion", "occlusion.size": 3}, "occlusion.size"),
        ({"method": "gradcam", "occlusion.patch": 4}, "not among the methods"),
        ({"method": "gradcam", "params": "{bad"}, "params is not valid JSON"),
        ({"method": "ig", "params": '{"ig": {"steps": 100000}}'}, "integrated_gradients.steps"),
        ({"method": "gradcam,saliency", "view": "overlay"}, "view=overlay"),
        ({"alpha": 2}, "alpha"),
        ({"cmap": "rainbow"}, "cmap"),
    ],
)
def test_errors_name_the_field(client: TestClient, test_pngs: list[bytes], params: dict[str, Any], needle: str) -> None:
    r = client.post("/explain", params=params, **upload(test_pngs[0]))
    assert r.status_code == 422, r.text
    assert needle in str(r.json()["detail"])
