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
    # The predicted class, whose map has something in it (another class's can be all zero after the ReLU, and
    # then the comparison could not fail), on a layer named in both calls.
    with torch.no_grad():
        index = int(model(x).argmax())
    want = explain(model, x, ["gradcam"], index, "layer3", None, meta["mean"], meta["std"])["gradcam"].heatmap[0]
    assert float(want.max()) > 0
    name = meta["classes"][index]
    for target in (str(index), name, name.upper()):
        params = {"target": target, "layer": "layer3", "format": "npy"}
        r = client.post("/explain", params=params, **upload(test_pngs[4]))
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
        ({"method": "lime"}, "one or more of"),
        ({"method": ""}, "method"),
        ({"method": "GradCAM"}, "one or more of"),
        ({"target": "ze;bra"}, "class name"),
        ({"layer": "layer7"}, "valid layers"),
        ({"method": "occlusion", "occlusion.patch": 0}, "occlusion.patch"),
        ({"method": "occlusion", "occlusion.size": 3}, "occlusion.size"),
        ({"method": "gradcam", "occlusion.patch": 0}, "occlusion.patch"),  # unused, but still checked
        ({"method": "gradcam", "lime.width": 4}, "not a method"),
        ({"method": "gradcam", "params": "{bad"}, "params is not valid JSON"),
        ({"method": "ig", "params": '{"integrated_gradients": {"steps": 100000}}'}, "integrated_gradients.steps"),
        ({"method": "ig", "params": '{"ig": {"steps": 8}}'}, "'ig' is not a method"),  # the schema's keys
        ({"alpha": 2}, "alpha"),
        ({"cmap": "rainbow"}, "cmap"),
    ],
)
def test_errors_name_the_field(client: TestClient, test_pngs: list[bytes], params: dict[str, Any], needle: str) -> None:
    r = client.post("/explain", params=params, **upload(test_pngs[0]))
    assert r.status_code == 422, r.text
    assert needle in str(r.json()["detail"])


@pytest.mark.parametrize(("target", "needle"), [("zebra", "not a class"), ("10", "0..9")])
def test_a_class_the_model_lacks_is_404(client: TestClient, test_pngs: list[bytes], target: str, needle: str) -> None:
    """Well formed (the schema's grammar) but absent from this model's classes: the model's state, not syntax."""
    r = client.post("/explain", params={"target": target}, **upload(test_pngs[0]))
    assert r.status_code == 404 and needle in r.json()["detail"], r.text


def test_parameters_for_methods_not_asked_are_set_aside_and_named(client: TestClient, test_pngs: list[bytes]) -> None:
    q = {"method": "gradcam", "format": "npy", "params": '{"occlusion": {"patch": 4}}', "smoothgrad.samples": 4}
    r = client.post("/explain", params=q, **upload(test_pngs[0]))
    assert r.status_code == 200, r.text
    assert r.headers["x-convlens-unused-params"] == "occlusion,smoothgrad"
    assert r.headers["x-convlens-methods"] == "gradcam"
    plain = client.post("/explain", params={"method": "gradcam", "format": "npy"}, **upload(test_pngs[0]))
    assert plain.content == r.content and "x-convlens-unused-params" not in plain.headers


def test_overlay_of_several_methods_draws_the_first(client: TestClient, test_pngs: list[bytes]) -> None:
    q = {"view": "overlay", "size": 64}
    both = client.post("/explain", params={**q, "method": "saliency,gradcam"}, **upload(test_pngs[0]))
    one = client.post("/explain", params={**q, "method": "saliency"}, **upload(test_pngs[0]))
    assert both.status_code == one.status_code == 200 and both.content == one.content
