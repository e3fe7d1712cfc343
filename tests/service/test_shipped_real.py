"""The model committed in the package: one file, its sha256, its card, and its recorded answers on real images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from models.checkpoints import load_checkpoint, sha256_file
from models.errors import CheckpointError
from models.shipped import SHIPPED_DIR, SHIPPED_ID
from service.images import ImageLimits, prepare
from tests.service.conftest import make_client

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-test"


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURES / "expected.json").read_text())


def test_the_package_ships_one_model_with_a_matching_sha256_and_card() -> None:
    assert sorted(p.name for p in SHIPPED_DIR.glob("*.safetensors")) == [f"{SHIPPED_ID}.safetensors"]
    meta = json.loads((SHIPPED_DIR / f"{SHIPPED_ID}.json").read_text())
    assert meta["sha256"] == sha256_file(SHIPPED_DIR / f"{SHIPPED_ID}.safetensors")
    card = meta["card"]
    assert card["test_acc"] > 0.85 and card["test_acc_tta_flip"] >= card["test_acc"] - 0.01
    assert sum(map(sum, meta["confusion"])) == 10_000 and len(card["per_class_acc"]) == 10
    assert (SHIPPED_DIR / f"{SHIPPED_ID}.safetensors").stat().st_size < 30 * 2**20  # half precision


@pytest.mark.slow
def test_recorded_answers_on_real_test_images(expected: dict) -> None:
    model, meta = load_checkpoint(SHIPPED_DIR / SHIPPED_ID)
    assert expected["sha256"] == meta["sha256"], "fixtures recorded for another model: rerun the script"
    assert len(expected["images"]) >= 20
    for rec in expected["images"]:
        png = (FIXTURES / rec["file"]).read_bytes()
        with torch.inference_mode():
            probs = torch.softmax(model(prepare(png, meta, ImageLimits())), 1)[0]
        assert int(probs.argmax()) == rec["predicted"], rec["file"]
        torch.testing.assert_close(probs, torch.tensor(rec["probabilities"]), rtol=1e-4, atol=1e-5)


def test_a_fresh_install_serves_it(tmp_path: Path, expected: dict) -> None:
    with make_client(tmp_path / "fresh", shipped_models=True) as client:
        assert client.get("/models").json()["default"] == SHIPPED_ID
        rec = expected["images"][0]
        files = [("files", (rec["file"], (FIXTURES / rec["file"]).read_bytes(), "image/png"))]
        body = client.post("/predict", files=files).json()
        assert body["model"] == SHIPPED_ID and body["predictions"][0]["top_k"][0]["index"] == rec["predicted"]
        card = client.get(f"/models/{SHIPPED_ID}").json()["card"]
        assert card["test_acc"] > 0.85


def test_a_corrupted_copy_is_refused(tmp_path: Path) -> None:
    for name in (f"{SHIPPED_ID}.json", f"{SHIPPED_ID}.safetensors"):
        (tmp_path / name).write_bytes((SHIPPED_DIR / name).read_bytes())
    w = tmp_path / f"{SHIPPED_ID}.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / SHIPPED_ID)
    client: TestClient
    with make_client(tmp_path / "home", model_dirs=[tmp_path], default_model=SHIPPED_ID) as client:
        r = client.post("/predict", files=[("files", ("x.png", b"x", "image/png"))])
        assert r.status_code == 503 and "sha256" in r.json()["detail"]
