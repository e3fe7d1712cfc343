"""Filters, activations, statistics, receptive fields and the top-k examples index."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.data import normalize
from models.errors import CheckpointError, InvalidArgument, UnknownLayer
from models.hooks import record_activations
from models.resnet import LAYER_NAMES, ResNet18, build_model, conv_layers
from models.reverse import ReverseResNet, reconstruct
from models.visual import (
    build_topk_index,
    channel_stats,
    feature_maps,
    filters,
    hit_projections,
    image_patch,
    load_topk_index,
    receptive_field,
    save_topk_index,
    topk_index_exists,
    topk_index_stem,
)
from tests.helpers import random_model

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> ResNet18:
    return random_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (30, 3, 32, 32), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)


def test_filters(model: ResNet18) -> None:
    assert filters(model, "conv1").shape == (64, 3, 7, 7)
    torch.testing.assert_close(filters(model, "conv3_x"), conv_layers(model)["layer2.0.conv1"].weight.detach())
    assert filters(model, "layer4.1.conv2").shape == (512, 512, 3, 3)
    assert filters(model, "layer2.0.downsample.0").shape == (128, 64, 1, 1)
    with pytest.raises(UnknownLayer, match="layer1.0.conv1"):
        filters(model, "layer1.0.bn1")


def test_feature_maps_and_stats(model: ResNet18, images: torch.Tensor) -> None:
    x = normalize(images[:1], MEAN, STD)
    fm = feature_maps(model, x[0], "conv2_x")
    torch.testing.assert_close(fm, record_activations(model, x, ["layer1"])["layer1"][0])
    act = torch.tensor([[[0.0, 2.0], [-1.0, 1.0]], [[0.0, 0.0], [0.0, 3.0]]])
    st = channel_stats(act)
    assert st.min.tolist() == [-1.0, 0.0] and st.max.tolist() == [2.0, 3.0] and st.mean.tolist() == [0.5, 0.75]
    assert st.active.tolist() == [0.5, 0.25]
    assert st.argmax_row.tolist() == [0, 1] and st.argmax_col.tolist() == [1, 1]
    with pytest.raises(InvalidArgument):
        feature_maps(model, x[0, :2], "conv1")


def test_receptive_field_boxes(model: ResNet18) -> None:
    assert receptive_field(model, "conv1", 5, 6, 32, 32) == (7, 9, 14, 16)  # 7x7/2, padding 3
    assert receptive_field(model, "conv1", 0, 0, 32, 32) == (0, 0, 4, 4)  # clipped at the corner
    cifar = build_model("resnet18-cifar")
    assert receptive_field(cifar, "conv1", 5, 6, 32, 32) == (4, 5, 7, 8)
    assert receptive_field(cifar, "layer1", 10, 10, 32, 32) == (5, 5, 16, 16)  # 3 + 4 x 2 = 11 pixels wide


@pytest.mark.parametrize("arch", ["resnet18", "resnet18-cifar"])
def test_projection_support_lies_inside_the_receptive_field(arch: str) -> None:
    model = random_model(arch, torch.float64)
    size = 96 if arch == "resnet18" else 32
    image = torch.randn(1, 3, size, size, dtype=torch.float64)
    rev = ReverseResNet(model)
    with torch.no_grad():
        rec = rev.record(image)
        for layer in LAYER_NAMES:
            act = rec.activations[layer]
            row, col = act.shape[-2] // 2, act.shape[-1] // 2
            seed = torch.zeros_like(act)
            seed[0, :, row, col] = 1.0
            proj = rev(seed, rec, layer)[0].abs().sum(0)
            top, left, bottom, right = receptive_field(model, layer, row, col, size, size)
            assert proj.any()
            inside = torch.zeros_like(proj, dtype=torch.bool)
            inside[top:bottom, left:right] = True
            assert not proj[~inside].any(), layer
    assert image_patch(image[0], (2, 3, 9, 7)).shape == (3, 7, 4)


def test_topk_index_is_the_strongest_in_order(model: ResNet18, images: torch.Tensor) -> None:
    fractions: list[float] = []
    index = build_topk_index(model, images, MEAN, STD, k=4, batch_size=7, progress=fractions.append)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) == 5
    assert index.k == 4 and index.num_images == 30 and list(index.values) == list(LAYER_NAMES)
    acts = record_activations(model, normalize(images, MEAN, STD), LAYER_NAMES)
    for layer in LAYER_NAMES:
        per_image = acts[layer].flatten(2).amax(2).t()  # (C, N): each image's strongest activation
        vals, imgs = index.values[layer], index.images[layer]
        assert (vals[:, :-1] >= vals[:, 1:]).all()  # strongest first
        torch.testing.assert_close(per_image.gather(1, imgs), vals)  # recomputed: those images, those values
        a = acts[layer]
        c = torch.arange(a.shape[1])[:, None].expand_as(imgs)
        at_hit = a[imgs, c, index.rows[layer], index.cols[layer]]
        torch.testing.assert_close(at_hit, vals)  # and at the recorded positions
        others = per_image.scatter(1, imgs, float("-inf"))
        assert (others.amax(1) <= vals[:, -1]).all()  # nothing left out beats the k-th
        assert all(len(set(row)) == 4 for row in imgs.tolist())  # k distinct images per channel
    hits = index.hits("conv5_x", 7)
    assert [h.value for h in hits] == pytest.approx(index.values["layer4"][7].tolist())
    with pytest.raises(InvalidArgument, match=r"0\.\.511"):
        index.hits("layer4", 512)


def test_topk_index_saves_loads_and_detects_corruption(model: ResNet18, images: torch.Tensor, tmp_path: Path) -> None:
    index = build_topk_index(model, images[:10], MEAN, STD, k=12, layers=["conv1", "layer3"], meta={"split": "test"})
    assert index.k == 10  # never more hits than images
    stem = topk_index_stem(tmp_path / "checkpoints" / "epoch-0003.safetensors")
    assert stem == tmp_path / "checkpoints" / "topk" / "epoch-0003"
    assert not topk_index_exists(stem)
    save_topk_index(index, stem)
    assert topk_index_exists(stem) and not list((tmp_path / "checkpoints").glob("epoch-*.safetensors"))
    loaded = load_topk_index(stem)
    assert loaded.meta == {"split": "test"} and list(loaded.values) == ["conv1", "layer3"]
    for part in ("values", "images", "rows", "cols"):
        for layer in loaded.values:
            assert torch.equal(getattr(loaded, part)[layer], getattr(index, part)[layer])
    path = Path(f"{stem}.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="rebuild"):
        load_topk_index(stem)
    with pytest.raises(CheckpointError, match="missing"):
        load_topk_index(tmp_path / "nothing")


def test_hit_projections_are_argmax_seeded(model: ResNet18, images: torch.Tensor) -> None:
    index = build_topk_index(model, images[:8], MEAN, STD, k=3, layers=["layer2"])
    hits = index.hits("layer2", 5)
    proj = hit_projections(model, images, MEAN, STD, "layer2", 5, hits)
    assert proj.shape == (3, 3, 32, 32)
    for h, p in zip(hits, proj, strict=True):
        x = normalize(images[h.image : h.image + 1], MEAN, STD)[0]
        r = reconstruct(model, x, "layer2", channels=[5], seed="argmax")
        assert r.argmax[0] == (h.row, h.col)
        torch.testing.assert_close(p, r.projections[0], rtol=1e-4, atol=1e-6)


def test_bad_index_arguments(model: ResNet18, images: torch.Tensor) -> None:
    with pytest.raises(InvalidArgument, match="uint8"):
        build_topk_index(model, images.float(), MEAN, STD)
    with pytest.raises(InvalidArgument, match="positive"):
        build_topk_index(model, images, MEAN, STD, k=0)
    with pytest.raises(UnknownLayer):
        build_topk_index(model, images, MEAN, STD, layers=["fc"])
