"""The models committed in the package (the seed-stem default and the CIFAR-stem one beside it): their files, sha256,
cards, and recorded answers on real images, through the model and through /predict?model=."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from models.checkpoints import load_checkpoint, sha256_file
from models.errors import CheckpointError
from models.shipped import CIFAR_STEM_ID, SHIPPED_DIR, SHIPPED_ID, SHIPPED_IDS
from service.images import ImageLimits, prepare
from tests.service.conftest import make_client

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-test"


def recorded(model_id: str) -> dict:
    """scripts/record_shipped_fixtures.py's answers of one shipped model on the fixture images."""
    name = "expected.json" if model_id == SHIPPED_ID else f"expected-{model_id}.json"
    return json.loads((FIXTURES / name).read_text())  # type: ignore[no-any-return]


def test_the_package_ships_two_models_with_matching_sha256_and_cards() -> None:
    assert sorted(p.name for p in SHIPPED_DIR.glob("*.safetensors")) == sorted(f"{i}.safetensors" for i in SHIPPED_IDS)
    floor = {SHIPPED_ID: 0.85, CIFAR_STEM_ID: 0.93}
    for model_id in SHIPPED_IDS:
        meta = json.loads((SHIPPED_DIR / f"{model_id}.json").read_text())
        assert meta["sha256"] == sha256_file(SHIPPED_DIR / f"{model_id}.safetensors")
        card = meta["card"]
        assert card["test_acc"] > floor[model_id] and card["test_acc_tta_flip"] >= card["test_acc"] - 0.01
        assert sum(map(sum, meta["confusion"])) == 10_000 and len(card["per_class_acc"]) == 10
        assert (SHIPPED_DIR / f"{model_id}.safetensors").stat().st_size < 30 * 2**20  # half precision
    assert json.loads((SHIPPED_DIR / f"{CIFAR_STEM_ID}.json").read_text())["arch"] == "resnet18-cifar"


@pytest.mark.slow
@pytest.mark.parametrize("model_id", SHIPPED_IDS)
def test_recorded_answers_on_real_test_images(model_id: str) -> None:
    expected = recorded(model_id)
    model, meta = load_checkpoint(SHIPPED_DIR / model_id)
    assert expected["sha256"] == meta["sha256"], "fixtures recorded for another model: rerun the script"
    assert len(expected["images"]) >= 20
    for rec in expected["images"]:
        png = (FIXTURES / rec["file"]).read_bytes()
        with torch.inference_mode():
            probs = torch.softmax(model(prepare(png, meta, ImageLimits())), 1)[0]
        assert int(probs.argmax()) == rec["predicted"], rec["file"]
        torch.testing.assert_close(probs, torch.tensor(rec["probabilities"]), rtol=1e-4, atol=1e-5)


def test_a_fresh_install_serves_both(tmp_path: Path) -> None:
    with make_client(tmp_path / "fresh", shipped_models=True) as client:
        listed = client.get("/models").json()
        assert listed["default"] == SHIPPED_ID and {m["id"] for m in listed["models"]} >= set(SHIPPED_IDS)
        for model_id in SHIPPED_IDS:
            rec = recorded(model_id)["images"][0]
            files = [("files", (rec["file"], (FIXTURES / rec["file"]).read_bytes(), "image/png"))]
            params = {} if model_id == SHIPPED_ID else {"model": model_id}
            body = client.post("/predict", files=files, params=params).json()
            assert body["model"] == model_id and body["predictions"][0]["top_k"][0]["index"] == rec["predicted"]
            detail = client.get(f"/models/{model_id}").json()
            assert detail["card"]["test_acc"] > 0.85
        assert client.get(f"/models/{CIFAR_STEM_ID}").json()["cam_layer"] == "layer4"  # 4x4 at 32px


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
