"""The /predict engine (service.engine): its gate refuses what differs from torch, its answers equal torch's,
its cache follows the weights, and torch serves whenever the engine cannot."""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from models.checkpoints import load_checkpoint, save_checkpoint
from models.data import load_cifar, train_val_split
from models.runs import RunStore
from service.engine import (
    F32_MAX_ABS_DIFF,
    EngineConfig,
    EngineRefused,
    _refusal,
    build_engine,
    calibration_inputs,
    compile_openvino,
    convert_openvino,
    engine_config,
    probe_batch,
    quantize_openvino,
    run_gate,
)
from service.images import normalize_batch
from service.registry import ModelRegistry
from service.settings import Settings
from tests.helpers import Server, add_run
from tests.service.conftest import make_client

ov = pytest.importorskip("openvino")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(trained_home: Path) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """The trained tiny model, its metadata and its checkpoint stem."""
    stem = trained_home / "runs" / "tiny" / "checkpoints" / "best"
    model, meta = load_checkpoint(stem)
    return model, meta, stem


def files(*pngs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    """A multipart `files` field per PNG."""
    return [("files", (f"img{i}.png", p, "image/png")) for i, p in enumerate(pngs)]


def config(tmp_path: Path, data: Path | None, **kw: Any) -> EngineConfig:
    """OpenVINO f32 on one thread, caching under tmp_path, gating on `data` (None: the synthetic set)."""
    return EngineConfig(**{"engine": "openvino", "precision": "f32", "threads": 1, "cache_dir": tmp_path, **kw},
                        data_root=data)  # fmt: skip


@pytest.mark.slow
def test_the_gate_refuses_a_perturbed_export_and_passes_the_true_one(tiny: Any, synthetic_data: Path,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    model, meta, _ = tiny
    cfg = config(tmp_path, synthetic_data)
    true_one = compile_openvino(ov, convert_openvino(ov, model, 32), "f32", 1)
    passed = run_gate(model, true_one, meta, "f32", cfg)
    assert passed["passed"] and passed["reason"] is None, passed
    assert passed["data"] == "validation" and passed["images"] == 100  # tiny holds out 100 synthetic images
    assert passed["probe_max_abs_diff"] <= F32_MAX_ABS_DIFF and passed["top1_agreement"] >= 0.999

    perturbed = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        perturbed.fc.weight.add_(1e-3 * torch.randn_like(perturbed.fc.weight))
    wrong = compile_openvino(ov, convert_openvino(ov, perturbed, 32), "f32", 1)
    refused = run_gate(model, wrong, meta, "f32", cfg)
    assert not refused["passed"] and "differ from torch" in refused["reason"], refused


def test_engine_answers_equal_torch_within_the_gate(tiny: Any, synthetic_data: Path, tmp_path: Path) -> None:
    model, meta, stem = tiny
    forward, info = build_engine(model, meta, stem, CPU, config(tmp_path, synthetic_data))
    assert forward is not None and info["engine"] == "openvino" and info["precision"] == "f32", info
    assert info["fallback_reason"] is None and info["gate"]["passed"]
    _, val = train_val_split(load_cifar(synthetic_data, "cifar10"), 100)
    assert val is not None
    x = normalize_batch(val.images, meta)
    with torch.inference_mode():
        want, got = model(x), forward(x)
    assert float((want - got).abs().max()) <= F32_MAX_ABS_DIFF
    assert torch.equal(want.argmax(1), got.argmax(1))


@pytest.mark.slow
def test_bf16_reports_its_accuracy_change_and_needs_the_labelled_split(tiny: Any, synthetic_data: Path,
                                                                       tmp_path: Path) -> None:  # fmt: skip
    model, meta, stem = tiny
    _, info = build_engine(model, meta, stem, CPU, config(tmp_path / "a", synthetic_data, precision="bf16"))
    if info["engine"] == "openvino":
        assert abs(info["gate"]["accuracy_change_points"]) <= 0.2, info
    else:  # refused: the reason states the change it measured
        assert "points (limit 0.2)" in info["fallback_reason"], info
    # Without the dataset there is nothing to measure the accuracy change on: bf16 is refused, torch serves.
    forward, none = build_engine(model, meta, stem, CPU, config(tmp_path / "b", None, precision="bf16"))
    assert forward is None and none["engine"] == "torch" and "validation split" in none["fallback_reason"], none


@pytest.mark.slow
def test_int8_is_quantized_on_training_images_and_gated_by_its_accuracy_change(tiny: Any, synthetic_data: Path,
                                                                             tmp_path: Path) -> None:  # fmt: skip
    model, meta, stem = tiny
    train, _ = train_val_split(load_cifar(synthetic_data, "cifar10"), 100)
    calibration = calibration_inputs(meta, synthetic_data)
    # Calibrated on the first training images (never the validation images the gate judges by).
    assert torch.equal(torch.from_numpy(calibration[0]), normalize_batch(train.images[: len(calibration[0])], meta))
    assert sum(len(c) for c in calibration) == min(1000, len(train))
    with pytest.raises(EngineRefused, match="validation split"):  # nothing to gate by: refused before quantizing
        calibration_inputs({**meta, "config": {**meta["config"], "val_size": 0}}, synthetic_data)
    quantized = quantize_openvino(convert_openvino(ov, model, 32), meta, synthetic_data)
    assert sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops()) >= 20  # every conv's input
    gate = run_gate(model, compile_openvino(ov, quantized, "int8", 1), meta, "int8", config(tmp_path, synthetic_data))
    assert gate["data"] == "validation" and "accuracy_change_points" in gate
    with torch.inference_mode():
        spread = float(model(probe_batch(32)).abs().max())
    # Quantized, not broken: the logits moved, by a fraction of their size (int8 kernels differ by CPU: AMX, VNNI).
    assert 0 < gate["probe_max_abs_diff"] < 0.5 * spread and gate["top1_agreement"] >= 0.8, (gate, spread)
    assert gate["passed"] == (abs(gate["accuracy_change_points"]) <= 0.2), gate

    # The path a server takes: quantized inside build_engine (not cached yet), gated, and served or refused.
    forward, info = build_engine(model, meta, stem, CPU, config(tmp_path / "a", synthetic_data, precision="int8"))
    assert forward is not None and info["engine"] == "openvino", info
    if gate["passed"]:
        assert info["precision"] == "int8" and info["gate"]["accuracy_change_points"] == gate["accuracy_change_points"]
    else:  # refused: f32 serves, and says what int8 measured
        assert info["precision"] == "f32" and "int8 changes validation accuracy" in info["fallback_reason"], info
    # Without the dataset there is nothing to calibrate on: f32 serves, saying why.
    forward, none = build_engine(model, meta, stem, CPU, config(tmp_path / "b", None, precision="int8"))
    assert forward is not None and none["precision"] == "f32" and "calibration" in none["fallback_reason"], none


def test_the_low_precision_gate_refuses_past_a_fifth_of_a_point() -> None:
    measured = {"probe_max_abs_diff": 0.05, "top1_agreement": 0.99, "images": 5000, "data": "validation"}
    for precision in ("bf16", "int8"):
        assert _refusal({**measured, "accuracy_change_points": -0.18}, precision) is None
        refused = _refusal({**measured, "accuracy_change_points": -0.22}, precision)
        assert refused == f"{precision} changes validation accuracy by -0.22 points (limit 0.2)"
        assert "validation split" in (_refusal({**measured, "data": "synthetic"}, precision) or "")


@pytest.mark.slow
def test_the_cache_follows_the_weights_and_a_corrupt_export_falls_back(tiny: Any, tmp_path: Path) -> None:
    model, meta, stem = tiny
    cfg = config(tmp_path / "cache", None)  # no dataset: the gate uses the fixed synthetic set
    first = build_engine(model, meta, stem, CPU, cfg)[1]
    again = build_engine(model, meta, stem, CPU, cfg)[1]
    assert first["gate"]["data"] == "synthetic" and not first["gate"]["cached"] and again["gate"]["cached"]
    folders = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(folders) == 1 and folders[0].startswith(meta["sha256"]) and folders[0].endswith("-f32-32px")

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.bias.add_(0.5)
    meta2 = save_checkpoint(other, tmp_path / "other" / "best", {k: v for k, v in meta.items() if k != "sha256"})
    info2 = build_engine(other, meta2, tmp_path / "other" / "best", CPU, cfg)[1]
    assert info2["engine"] == "openvino" and not info2["gate"]["cached"]
    assert len(list((tmp_path / "cache").iterdir())) == 2 and meta2["sha256"] != meta["sha256"]

    (tmp_path / "cache" / folders[0] / "model.bin").write_bytes(b"\0" * 64)  # a corrupt cached export
    forward, broken = build_engine(model, meta, stem, CPU, cfg)
    assert forward is None and broken["engine"] == "torch" and "f32" in broken["fallback_reason"], broken


def test_torch_serves_when_the_package_is_missing(tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    model, meta, stem = tiny
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    forward, info = build_engine(model, meta, stem, CPU, config(tmp_path, None))
    assert forward is None and info["engine"] == "torch" and "not installed" in info["fallback_reason"]
    assert "serves /predict with torch" in caplog.text
    named = build_engine(model, meta, stem, CPU, config(tmp_path, None, package="convlens_no_such_engine"))
    assert named[0] is None and "convlens_no_such_engine is not installed" in named[1]["fallback_reason"]


@pytest.mark.slow
def test_registry_models_carry_their_engine(trained_home: Path, tmp_path: Path) -> None:
    store = RunStore(trained_home)
    cfg = EngineConfig(engine="openvino", precision="f32", threads=1, cache_dir=tmp_path)
    loaded = ModelRegistry(store, engine=cfg).get("tiny")
    assert loaded.predict_forward is not None and loaded.engine["engine"] == "openvino"
    eager = ModelRegistry(store, engine=EngineConfig(engine="torch")).get("tiny")
    assert eager.predict_forward is None and eager.engine == {
        "engine": "torch", "precision": "f32", "gate": None, "fallback_reason": None,
    }  # fmt: skip


def test_the_engines_threads_default_to_every_core_shared_out(tmp_path: Path) -> None:
    """Unlike eager torch's (the cores less the event loop's), the engine's sleeping workers take every core."""
    cores = len(os.sched_getaffinity(0))
    assert engine_config(Settings(home=tmp_path)).threads == cores
    assert engine_config(Settings(home=tmp_path, api_processes=2)).threads == max(1, cores // 2)
    assert engine_config(Settings(home=tmp_path, torch_threads=1)).threads == 1  # the suite's servers
    assert engine_config(Settings(home=tmp_path, torch_threads=1, predict_threads=3)).threads == 3


AUTO = {"CONVLENS_PREDICT_ENGINE": "auto"}  # the production default (the suite's servers default to torch)


# ---- through the service -------------------------------------------------------------------------------------------


def test_models_id_names_the_engine_and_predict_limits_hold(trained_home: Path, test_pngs: list[bytes]) -> None:
    settings = {"max_images_per_request": 3, "batch_max_size": 2, "predict_engine": "auto", "predict_threads": 2}
    with make_client(trained_home, **settings) as c:
        detail = c.get("/models/tiny").json()
        engine = detail["predict_engine"]
        assert engine["engine"] == "openvino" and engine["precision"] == "f32" and engine["gate"]["passed"], engine
        assert engine["threads"] == 2, engine  # read back from the compiled model
        assert c.post("/predict", files=files(*test_pngs[:4])).status_code == 413
        r = c.post("/predict", files=files(*test_pngs[:3]), params={"top_k": 10})  # two forward passes (max 2)
        assert r.status_code == 200 and [len(p["top_k"]) for p in r.json()["predictions"]] == [10, 10, 10]
        assert c.post("/predict", files=files(b"not an image")).status_code == 422
        assert c.post("/predict", files=files(test_pngs[0]), params={"top_k": 11}).status_code == 422


@pytest.mark.slow
def test_a_server_falls_back_to_torch_on_a_corrupt_export_never_a_500(
    home: Path, synthetic_data: Path, server_factory: Callable[..., Server], test_pngs: list[bytes]
) -> None:
    add_run(home, "second", created=1.0)  # older: tiny stays the default, loaded at startup
    eager = server_factory(home, synthetic_data, env={"CONVLENS_PREDICT_ENGINE": "torch"})
    assert httpx.get(eager.url + "/models/tiny").json()["predict_engine"]["engine"] == "torch"
    want = httpx.post(eager.url + "/predict", files=files(test_pngs[0]), params={"top_k": 10}).json()
    eager.stop()

    compiled = server_factory(home, synthetic_data, env=AUTO)  # the defaults: OpenVINO, f32; the export is cached
    got = httpx.post(compiled.url + "/predict", files=files(test_pngs[0]), params={"top_k": 10}).json()
    a, b = (torch.tensor([c["probability"] for c in p["predictions"][0]["top_k"]]) for p in (want, got))
    assert [c["index"] for c in got["predictions"][0]["top_k"]] == [c["index"] for c in want["predictions"][0]["top_k"]]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    compiled.stop()

    for gate in (home / "engines").glob("*/gate.json"):  # every cached export now holds garbage weights
        (gate.parent / "model.bin").unlink()  # a hard link into the shared store: replace it, never write through
        (gate.parent / "model.bin").write_bytes(b"garbage")
        assert json.loads(gate.read_text())["passed"]
    fallback = server_factory(home, synthetic_data, env=AUTO)
    r = httpx.post(fallback.url + "/predict", files=files(test_pngs[0]), params={"model": "second"})
    assert r.status_code == 200, r.text
    engine = httpx.get(fallback.url + "/models/second").json()["predict_engine"]
    assert engine["engine"] == "torch" and "f32" in engine["fallback_reason"], engine
    assert "serves /predict with torch" in fallback.log()
