"""The shipped model: export with its card, half precision verified by sha256, served by default on a fresh home."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from convlens.main import main
from models.checkpoints import load_checkpoint, sha256_file
from models.config import TrainConfig
from models.data import DATASETS, Augment, DeviceLoader, load_cifar
from models.runs import RunStore
from models.shipped import export_model
from models.trainer import evaluate
from tests.service.conftest import make_client
from worker.jobs import execute_run


@pytest.fixture(scope="module")
def exported(trained_home: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shipped")
    run = RunStore(trained_home).read_run("tiny")
    export_model(trained_home / "runs" / "tiny" / "checkpoints" / "best", out, "tiny-shipped", synthetic_data, run)
    return out


def test_export_writes_half_precision_and_a_measured_card(exported: Path, synthetic_data: Path) -> None:
    weights = load_file(str(exported / "tiny-shipped.safetensors"))
    floats = [t for t in weights.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float16 for t in floats)
    meta = json.loads((exported / "tiny-shipped.json").read_text())
    assert meta["sha256"] == sha256_file(exported / "tiny-shipped.safetensors")
    card = meta["card"]
    # The card's accuracy is that of the shipped (fp16) weights on the test split, recomputed here.
    model, _ = load_checkpoint(exported / "tiny-shipped")
    info = DATASETS["cifar10"]
    test = load_cifar(synthetic_data, "cifar10", train=False)
    ev = evaluate(model, DeviceLoader(test, 100, info.mean, info.std, shuffle=False), torch.device("cpu"), 10)
    assert card["test_acc"] == pytest.approx(ev["acc"]) and meta["confusion"] == ev["confusion"]
    assert set(card["per_class_acc"]) == set(meta["classes"]) and 0 <= card["test_acc_tta_flip"] <= 1
    assert card["recipe"]["epochs"] == 1 and card["limits"] and card["hardware"]["cores"] >= 1


@pytest.mark.slow
def test_export_tests_an_upsampled_model_on_upsampled_images(synthetic_data: Path, tmp_path: Path) -> None:
    store = RunStore(tmp_path / "home")
    cfg = TrainConfig(epochs=1, batch_size=50, val_size=100, train_limit=200, milestones=[], resize=40)
    store.create_run(cfg.model_dump(), run_id="up")
    run = execute_run(store, "up", synthetic_data, device="cpu", tensorboard=False)
    assert run["status"] == "succeeded", run
    best = tmp_path / "home" / "runs" / "up" / "checkpoints" / "best"
    meta = export_model(best, tmp_path / "out", "up-shipped", synthetic_data, run)
    model, smeta = load_checkpoint(tmp_path / "out" / "up-shipped")
    assert smeta["input_size"] == 40 and "40x40" in meta["card"]["limits"][0]
    info = DATASETS["cifar10"]
    test = load_cifar(synthetic_data, "cifar10", train=False)

    def ev(size: int | None) -> dict:
        loader = DeviceLoader(test, 100, info.mean, info.std, augment=Augment(False, False, size), shuffle=False)
        return evaluate(model, loader, torch.device("cpu"), 10)

    up, native = ev(40), ev(None)
    assert up["loss"] != pytest.approx(native["loss"])  # the two input sizes are told apart
    assert meta["card"]["test_loss"] == pytest.approx(up["loss"]) and meta["confusion"] == up["confusion"]


def test_fresh_home_serves_the_shipped_default_and_its_card(exported: Path, tmp_path: Path) -> None:
    settings = {"model_dirs": [exported], "default_model": "tiny-shipped", "shipped_models": False}
    with make_client(tmp_path / "fresh", **settings) as client:
        assert client.get("/ready").status_code in (200, 503)  # the broker may be down; the model is loaded
        body = client.get("/models").json()
        assert body["default"] == "tiny-shipped"
        (entry,) = body["models"]
        assert entry["source"] == "shipped"
        detail = client.get("/models/tiny-shipped").json()
        assert detail["card"]["test_acc"] == entry["accuracy"]
        r = client.get("/models/tiny-shipped/confusion.png")
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size[0] > 100
        img = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(img, "PNG")
        r = client.post("/predict", files=[("files", ("r.png", img.getvalue(), "image/png"))])
        assert r.status_code == 200 and r.json()["model"] == "tiny-shipped"


def test_a_tampered_shipped_file_is_refused_with_a_clear_503(exported: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    w = bad / "tiny-shipped.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the weights
    w.write_bytes(bytes(data))
    with make_client(tmp_path / "fresh", model_dirs=[bad], default_model="tiny-shipped") as client:
        r = client.post("/predict", files=[("files", ("r.png", b"x", "image/png"))])
        assert r.status_code == 503 and "sha256" in r.json()["detail"]


def test_export_command(
    trained_home: Path, synthetic_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    args = ["export", "tiny", "--home", str(home), "--data", str(synthetic_data), "--out", str(tmp_path / "o")]
    assert main([*args, "--name", "cli-model"]) == 0
    assert (tmp_path / "o" / "cli-model.safetensors").is_file() and "test_acc" in capsys.readouterr().out
    assert main([*args, "--name", "../x"]) == 2 and "invalid run id" in capsys.readouterr().err
