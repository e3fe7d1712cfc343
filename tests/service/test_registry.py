"""The model registry over a real run store: listing, rescans, the default, the bounded cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.checkpoints import load_checkpoint
from models.errors import InvalidArgument
from models.resnet import ResNet18
from models.runs import RunStore
from service.batching import Batcher
from service.errors import ModelNotFound, NoModel
from service.registry import ModelRegistry, checkpoint_dir_source
from tests.helpers import add_run


def registry(home: Path, **kw: object) -> ModelRegistry:
    return ModelRegistry(RunStore(home), **kw)  # type: ignore[arg-type]


def test_lists_finished_runs_and_loads_the_same_model(trained_home: Path) -> None:
    reg = registry(trained_home)
    [entry] = reg.list_models()
    assert (entry.id, entry.source, entry.meta["arch"]) == ("tiny", "run", "resnet18")
    assert entry.accuracy is not None and reg.default_id() == "tiny"
    loaded = reg.get()
    assert loaded.id == "tiny" and loaded.num_classes == 10 and len(loaded.classes) == 10
    ref, _ = load_checkpoint(trained_home / "runs" / "tiny" / "checkpoints" / "best")
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), ref(x))
    assert reg.get("tiny") is loaded  # cached


@pytest.mark.parametrize("bad", ["../tiny", "runs/tiny", "/etc/passwd", "", "a" * 65, "tiny/../../x"])
def test_ids_are_validated_never_paths(trained_home: Path, bad: str) -> None:
    with pytest.raises(InvalidArgument, match="model id"):
        registry(trained_home).get(bad)


def test_unknown_id_is_not_found(trained_home: Path) -> None:
    with pytest.raises(ModelNotFound, match="GET /models"):
        registry(trained_home).get("nope")


def test_empty_store_says_how_to_train(tmp_path: Path) -> None:
    with pytest.raises(NoModel, match="convlens train"):
        registry(tmp_path).get()


def test_a_finished_run_appears_without_restart_and_running_ones_do_not(home: Path) -> None:
    reg = registry(home)
    assert [e.id for e in reg.list_models()] == ["tiny"]
    add_run(home, "still-running", status="running")
    add_run(home, "fresh")
    assert reg.entry("fresh").id == "fresh"  # a miss rescans
    assert [e.id for e in reg.list_models()] == ["fresh", "tiny"]
    with pytest.raises(ModelNotFound):
        reg.entry("still-running")


def test_default_newest_then_registry_json_then_survives_restart(home: Path) -> None:
    add_run(home, "newer")
    reg = registry(home, default_model="tiny")
    assert reg.default_id() == "tiny"  # the configured default, while registry.json names none
    assert registry(home).default_id() == "newer"  # no choice anywhere: the newest
    reg.set_default("newer")
    assert json.loads((home / "registry.json").read_text())["default"] == "newer"
    assert registry(home, default_model="tiny").default_id() == "newer"  # another process reads the choice
    with pytest.raises(ModelNotFound):
        reg.set_default("missing")


def test_cache_is_bounded_lru_and_holders_keep_evicted_models(home: Path) -> None:
    for rid in ("b", "c"):
        add_run(home, rid)
    loads: list[str] = []
    reg = registry(home, cache_size=2, on_load=lambda mid, s: loads.append(mid))
    a = reg.get("tiny")
    reg.get("b")
    reg.get("tiny")  # touch: b is now least recent
    reg.get("c")
    assert reg.loaded_ids() == ["tiny", "c"] and loads == ["tiny", "b", "c"]
    with torch.inference_mode():
        assert a.model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)  # an evicted model still works for its holder


def test_registry_json_names_and_shipped_folders(home: Path, tmp_path: Path) -> None:
    rel = "runs/tiny/checkpoints/best"
    (home / "registry.json").write_text(json.dumps({"models": {"alias": rel, "escape": "../../outside/best"}}))
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for suffix in (".json", ".safetensors"):
        (shipped / f"stock{suffix}").write_bytes((home / f"{rel}{suffix}").read_bytes())
    reg = registry(home, extra_sources=[("shipped", checkpoint_dir_source(shipped))])
    got = {e.id: e.source for e in reg.list_models()}
    assert got == {"tiny": "run", "alias": "registry", "stock": "shipped"}
    assert reg.get("stock").num_classes == 10


def test_a_replaced_checkpoint_is_reloaded_after_a_rescan(home: Path) -> None:
    reg = registry(home)
    first = reg.get("tiny")
    meta_file = home / "runs" / "tiny" / "checkpoints" / "best.json"
    meta = json.loads(meta_file.read_text())
    meta_file.unlink()  # a hard link into the shared store: replace, never write through it
    meta_file.write_text(json.dumps({**meta, "sha256": None}))
    reg.list_models()
    assert reg.get("tiny") is not first


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "padded"])
def test_a_model_is_warmed_with_the_batchers_shapes(trained_home: Path, pad: bool) -> None:
    """The batcher owns the padding rule, so the registry warms exactly the shapes its forwards take on this device
    (here the CPU stands in for CUDA): every padded size where it pads, else one image."""
    batcher = Batcher(max_batch=16, pad_devices=("cpu",) if pad else ())
    sizes: list[int] = []

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: object) -> None:
        if isinstance(module, ResNet18):  # the whole network's input, not each layer's
            sizes.append(int(args[0].shape[0]))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        registry(trained_home, warm_sizes=batcher.warm_sizes).get("tiny")
    finally:
        hook.remove()
    assert sizes == ([1, 2, 4, 8, 16] if pad else [1]), sizes
