"""POST /predict: answers equal the model's own, limits and errors, and micro-batching over a real server."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models.checkpoints import load_checkpoint
from models.runs import RunStore
from service.batching import Batcher, padded_sizes
from service.errors import Overloaded, status_for
from service.images import ImageLimits, normalize_batch, prepare
from service.registry import ModelRegistry
from service.schemas import PredictResponse
from tests.helpers import Server, add_run, png_bytes
from tests.service.conftest import make_client

LIMITS = ImageLimits()
NOISE_PNG = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def reference(trained_home: Path) -> Callable[[bytes], torch.Tensor]:
    """The model's own prediction: probabilities of one image through the checkpoint, outside the service."""
    model, meta = load_checkpoint(trained_home / "runs" / "tiny" / "checkpoints" / "best")

    def predict(png: bytes) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(model(prepare(png, meta, LIMITS)), dim=1)[0]

    return predict


def files(*pngs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"img{i}.png", p, "image/png")) for i, p in enumerate(pngs)]


def assert_matches(pred: dict[str, Any], probs: torch.Tensor, k: int) -> None:
    """Same classes in the same order, and the same probabilities to float32 precision."""
    values, indices = probs.topk(k)
    assert [c["index"] for c in pred["top_k"]] == indices.tolist()
    got = torch.tensor([c["probability"] for c in pred["top_k"]])
    torch.testing.assert_close(got, values, rtol=1e-5, atol=1e-6)


def test_one_image_equals_the_models_own_prediction(client: TestClient, test_pngs: list[bytes], reference: Any) -> None:
    r = client.post("/predict", files=files(test_pngs[0]), params={"top_k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and len(body["predictions"]) == 1
    pred = body["predictions"][0]
    assert pred["filename"] == "img0.png" and pred["image"] == 0
    assert_matches(pred, reference(test_pngs[0]), 10)
    assert abs(sum(c["probability"] for c in pred["top_k"]) - 1) < 1e-5
    assert pred["top_k"][0]["name"] in {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                        "ship", "truck"}  # fmt: skip
    # The handler builds its JSON itself (FastAPI does not validate it again): it must be the documented shape.
    assert PredictResponse.model_validate(body).model_dump(mode="json") == body


def test_many_images_multipart_and_json_agree(client: TestClient, test_pngs: list[bytes], reference: Any) -> None:
    pngs = test_pngs[:5]
    multi = client.post("/predict", files=files(*pngs), params={"top_k": 3, "model": "tiny"}).json()
    js = client.post("/predict", json={"images": [base64.b64encode(p).decode() for p in pngs]}, params={"top_k": 3})
    assert js.status_code == 200, js.text
    for i, png in enumerate(pngs):
        assert multi["predictions"][i]["image"] == i
        assert_matches(multi["predictions"][i], reference(png), 3)
        assert_matches(js.json()["predictions"][i], reference(png), 3)
        assert js.json()["predictions"][i]["filename"] is None


def test_any_mode_and_size_is_accepted(client: TestClient) -> None:
    rgba = png_bytes(np.random.default_rng(0).integers(0, 256, (100, 60, 4), dtype=np.uint8))
    gray16 = png_bytes(np.random.default_rng(1).integers(0, 65536, (17, 40), dtype=np.uint16))
    buf = io.BytesIO()
    Image.new("CMYK", (50, 50), (0, 100, 0, 0)).save(buf, format="JPEG")
    r = client.post("/predict", files=files(rgba, gray16, buf.getvalue()))
    assert r.status_code == 200, r.text
    assert [len(p["top_k"]) for p in r.json()["predictions"]] == [5, 5, 5]


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("empty file", {"files": files(b"")}, 422, "empty"),
    ("text", {"files": files(b"just some text")}, 422, "not an image"),
    ("truncated", {"files": files(NOISE_PNG[: len(NOISE_PNG) // 2])}, 422, "truncated"),
    ("other field", {"files": [("image", ("a.png", b"x", "image/png"))]}, 422, "files"),
    ("bad base64", {"json": {"images": ["***"]}}, 422, "base64"),
    ("json no images", {"json": {"pictures": []}}, 422, "images"),
    ("json empty list", {"json": {"images": []}}, 422, "no images"),
    ("json not json", {"content": b"{nope", "headers": {"content-type": "application/json"}}, 422, "JSON"),
    ("text/plain", {"content": b"hi", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
    ("no content type", {"content": b"hi"}, 415, "multipart"),
    ("broken multipart", {"content": b"--x\r\nbad", "headers": {"content-type": "multipart/form-data"}}, 422, "bound"),
    ("bad top_k", {"files": files(b"x"), "params": {"top_k": 11}}, 422, "top_k"),
    ("zero top_k", {"files": files(b"x"), "params": {"top_k": 0}}, 422, ""),
    ("path as model", {"files": files(b"x"), "params": {"model": "../runs/tiny"}}, 422, "model id"),
    ("unknown model", {"files": files(b"x"), "params": {"model": "nope"}}, 404, "GET /models"),
]


@pytest.mark.parametrize(("name", "kw", "status", "words"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_a_reason(client: TestClient, name: str, kw: dict[str, Any], status: int,
                                            words: str) -> None:  # fmt: skip
    r = client.post("/predict", **kw)
    assert r.status_code == status, r.text
    assert words in str(r.json()["detail"])


def test_limits_are_413(trained_home: Path, test_pngs: list[bytes]) -> None:
    big = png_bytes(np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8))
    with make_client(trained_home, max_upload_bytes=20_000, max_images_per_request=3, max_image_pixels=4096) as c:
        too_many = c.post("/predict", files=files(*test_pngs[:4]))
        assert too_many.status_code == 413 and "more than 3 images" in too_many.json()["detail"]
        json_many = c.post("/predict", json={"images": [base64.b64encode(p).decode() for p in test_pngs[:4]]})
        assert json_many.status_code == 413
        body = c.post("/predict", files=files(big))
        assert body.status_code == 413 and "limit" in body.json()["detail"]
        pixels = c.post("/predict", files=files(png_bytes(np.zeros((100, 100), np.uint8))))
        assert pixels.status_code == 413 and "pixels" in pixels.json()["detail"]
        assert c.post("/predict", files=files(*test_pngs[:3])).status_code == 200


def test_no_model_is_503_saying_how_to_train(tmp_path: Path, test_pngs: list[bytes]) -> None:
    with make_client(tmp_path) as c:
        r = c.post("/predict", files=files(test_pngs[0]))
        assert r.status_code == 503
        assert "convlens train" in r.json()["detail"] and "POST /train" in r.json()["detail"]


# ---- a real server process -------------------------------------------------------------------------------------


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return float(s.value)
    return 0.0


async def _post_all(url: str, pngs: list[bytes], params: dict[str, Any] | None = None) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(pngs))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        return await asyncio.gather(*(c.post("/predict", files=files(p), params=params or {}) for p in pngs))


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    server: Server, test_pngs: list[bytes], reference: Any
) -> None:
    before_images, before_batches = (
        metric(server, "convlens_batch_size_sum"),
        metric(server, "convlens_batch_size_count"),
    )
    responses = asyncio.run(_post_all(server.url, test_pngs, {"top_k": 10}))
    assert [r.status_code for r in responses] == [200] * len(test_pngs)
    for png, r in zip(test_pngs, responses, strict=True):
        assert_matches(r.json()["predictions"][0], reference(png), 10)
    images = metric(server, "convlens_batch_size_sum") - before_images
    batches = metric(server, "convlens_batch_size_count") - before_batches
    assert images == len(test_pngs)
    assert batches < images / 2, f"{images} images in {batches} forward passes: requests were not batched"


@pytest.mark.slow
def test_default_swap_keeps_requests_in_flight_and_new_runs_appear(
    home: Path, synthetic_data: Path, server_factory: Callable[..., Server], test_pngs: list[bytes]
) -> None:
    add_run(home, "second", created=0.0)  # older: "tiny" stays the default until chosen
    server = server_factory(home, synthetic_data)

    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            load = [asyncio.create_task(c.post("/predict", files=files(p))) for p in test_pngs[:40]]
            await asyncio.sleep(0.05)
            swap = await c.post("/models/second/default")
            return list(await asyncio.gather(*load)), swap

    responses, swap = asyncio.run(scenario())
    assert swap.status_code == 200 and swap.json()["default"] is True
    assert all(r.status_code == 200 for r in responses)
    assert {r.json()["model"] for r in responses} <= {"tiny", "second"}
    after = httpx.post(server.url + "/predict", files=files(test_pngs[0]))
    assert after.json()["model"] == "second"
    add_run(home, "late")  # a job finishing while the server runs
    assert "late" in [m["id"] for m in httpx.get(server.url + "/models").json()["models"]]
    r = httpx.post(server.url + "/predict", files=files(test_pngs[0]), params={"model": "late"})
    assert r.status_code == 200 and r.json()["model"] == "late"


# ---- the batcher in-process ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "padded"])
def test_batcher_answers_each_caller_and_runs_calls_alone(trained_home: Path, pad: bool) -> None:
    """Padded (as on CUDA, here on the CPU), every forward has one of the few warmed shapes and the answers are
    the same: batch norm in eval mode treats each image alone, and the padding rows are cut off."""
    loaded = ModelRegistry(RunStore(trained_home)).get("tiny")
    shapes: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        shapes.append(int(x.shape[0]))
        return loaded.model(x)

    loaded = dataclasses.replace(loaded, predict_forward=forward)
    xs = [torch.randint(0, 256, (1 + i % 3, 3, 32, 32), dtype=torch.uint8) for i in range(24)]
    batcher = Batcher(max_batch=16, max_wait_ms=20, pad_devices=("cpu",) if pad else ())
    batcher.start()
    seen: list[int] = []

    def alone_on_the_thread() -> int:
        seen.append(batcher.depth)
        return 7

    async def run() -> tuple[list[torch.Tensor], int]:
        outs = asyncio.gather(*(batcher.predict(loaded, x) for x in xs))
        alone = await batcher.call(alone_on_the_thread)
        return list(await outs), alone

    try:
        outs, alone = asyncio.run(run())
    finally:
        batcher.close()
    assert alone == 7 and seen
    images = sum(int(x.shape[0]) for x in xs)
    if pad:
        assert set(shapes) <= set(padded_sizes(16)) and sum(shapes) >= images, shapes
    else:
        assert sum(shapes) == images, shapes
    with torch.inference_mode():
        for x, out in zip(xs, outs, strict=True):
            want = torch.softmax(loaded.model(normalize_batch(x, loaded.meta)), dim=1)
            assert out.shape == (x.shape[0], 10)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_a_full_queue_is_503_with_retry_after(trained_home: Path) -> None:
    loaded = ModelRegistry(RunStore(trained_home)).get("tiny")
    batcher = Batcher(max_queue=2)  # not started: nothing drains the queue

    async def run() -> None:
        first = asyncio.ensure_future(batcher.predict(loaded, torch.zeros(2, 3, 32, 32, dtype=torch.uint8)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as e:
            await batcher.predict(loaded, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        assert status_for(e.value) == 503
        first.cancel()

    asyncio.run(run())
