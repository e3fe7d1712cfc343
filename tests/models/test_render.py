"""Every PNG decodes to the size its layout function promises; npy and JSON helpers keep shape and dtype."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.errors import InvalidArgument
from models.render import (
    activation_grid_png,
    activation_grid_size,
    display_projection,
    filters_channels_png,
    filters_channels_size,
    filters_rgb_png,
    filters_rgb_size,
    grid_shape,
    grid_size,
    npy_bytes,
    projection_grid_png,
    projection_grid_size,
    stats_json,
    tensor_json,
)


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img.convert("RGB")


def hw(img: Image.Image) -> tuple[int, int]:
    return img.size[1], img.size[0]


def test_grid_shape_is_as_square_as_the_count_allows() -> None:
    assert [grid_shape(n) for n in (1, 3, 4, 5, 64, 65, 512)] == [
        (1, 1),
        (1, 3),
        (1, 4),
        (2, 3),
        (8, 8),
        (8, 9),
        (23, 23),
    ]
    assert grid_size(64, 28, 28) == (8 * 30 + 2, 8 * 30 + 2)
    assert grid_size(1, 5, 7) == (5, 7)
    with pytest.raises(InvalidArgument):
        grid_shape(0)


def test_filter_renderings_decode_to_the_promised_size() -> None:
    w = torch.randn(64, 3, 7, 7)
    img = decode(filters_channels_png(w))
    assert hw(img) == filters_channels_size(w.shape) == (242 + 16, 3 * 242 + 4 * 8)
    assert hw(decode(filters_rgb_png(w))) == filters_rgb_size(w.shape) == (8 * 30 + 2, 8 * 30 + 2)
    deep = torch.randn(128, 64, 3, 3)
    assert hw(decode(filters_channels_png(deep, in_channels=[0, 5]))) == filters_channels_size(deep.shape, [0, 5])
    assert hw(decode(filters_channels_png(w, scale=1))) == filters_channels_size(w.shape, scale=1)
    with pytest.raises(InvalidArgument, match="3 input channels"):
        filters_rgb_png(deep)
    with pytest.raises(InvalidArgument, match=r"0\.\.63"):
        filters_channels_png(deep, in_channels=[64])
    with pytest.raises(InvalidArgument, match="too many"):
        filters_channels_png(torch.randn(512, 512, 3, 3))


def test_filter_colours_keep_the_sign() -> None:
    w = torch.zeros(2, 3, 1, 1)
    w[0, 0] = 1.0  # red in the seismic map (method 1); red channel up in RGB (method 2)
    w[1, 0] = -1.0
    seismic = np.asarray(decode(filters_channels_png(w, in_channels=[0], scale=1)))
    pos, neg = seismic[2, 2], seismic[2, 5]  # 1x1 tiles after 2 px padding, 3 px apart
    assert int(pos[0]) - int(pos[2]) > 50 and int(neg[2]) - int(neg[0]) > 50  # dark red, dark blue
    rgb = np.asarray(decode(filters_rgb_png(w, scale=1))).astype(int)
    assert rgb[2, 2].tolist() == [255, 128, 128] and rgb[2, 5].tolist() == [0, 128, 128]  # zero is mid-grey


def test_activation_grids() -> None:
    act = torch.rand(64, 16, 16)
    assert hw(decode(activation_grid_png(act))) == activation_grid_size(act.shape) == grid_size(64, 32, 32)
    labelled = activation_grid_png(act, labels=[str(i) for i in range(64)], per_channel=True)
    assert hw(decode(labelled)) == activation_grid_size(act.shape)
    deep = torch.rand(512, 1, 1)
    assert hw(decode(activation_grid_png(deep))) == activation_grid_size(deep.shape) == grid_size(512, 32, 32)
    one = torch.rand(1, 4, 4)
    assert hw(decode(activation_grid_png(one, labels=["7"]))) == activation_grid_size(one.shape) == (32, 32)
    assert hw(decode(activation_grid_png(torch.zeros(3, 8, 8)))) == activation_grid_size((3, 8, 8))
    with pytest.raises(InvalidArgument):
        activation_grid_png(act, labels=["a"])


def test_projection_grids() -> None:
    proj = torch.randn(64, 3, 32, 32, dtype=torch.float64)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    img = decode(projection_grid_png(proj, image))
    assert hw(img) == projection_grid_size(64, 32, 32) == grid_size(65, 32, 32)
    assert np.array_equal(np.asarray(img)[2:34, 2:34], image.permute(1, 2, 0).numpy())  # the input comes first
    labels = [f"ch {i}" for i in range(64)]
    assert hw(decode(projection_grid_png(proj, image.float() / 255, labels=labels))) == projection_grid_size(64, 32, 32)
    assert hw(decode(projection_grid_png(proj[:1]))) == projection_grid_size(1, 32, 32, with_image=False)
    shown = display_projection(torch.tensor([[[[0.0, 2.0, -1.0]]] * 3]))
    assert shown[0, 0, 0].tolist() == [0.5, 1.0, 0.25]
    assert (display_projection(torch.zeros(1, 3, 2, 2)) == 0.5).all()


def test_npy_and_json_helpers() -> None:
    t = torch.randn(5, 3, 4, dtype=torch.float64)
    arr = np.load(io.BytesIO(npy_bytes(t)))
    assert arr.shape == (5, 3, 4) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, t.numpy(), rtol=1e-6)
    doc = json.loads(json.dumps(tensor_json(t)))
    assert doc["shape"] == [5, 3, 4] and doc["dtype"] == "float32" and len(doc["values"]) == 5
    assert set(doc["stats"]) == {"min", "max", "mean", "std", "active", "argmax"} and len(doc["stats"]["argmax"]) == 5
    st = stats_json(torch.tensor([[[0.0, 3.0]]]))
    assert st["max"] == [3.0] and st["argmax"] == [[0, 1]] and st["active"] == [0.5]
    assert "stats" not in tensor_json(torch.zeros(4))
