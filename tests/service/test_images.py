"""Image decoding: every mode to RGB, the eval transform, and refusals with actionable messages."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from models.data import DATASETS, normalize
from models.errors import BadImage
from service.errors import PayloadTooLarge
from service.images import ImageLimits, decode_base64, decode_image, prepare, to_tensor
from tests.helpers import png_bytes

INFO = DATASETS["cifar10"]
META = {"mean": list(INFO.mean), "std": list(INFO.std), "input_size": 32}
LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=4_000_000)
NOISE_PNG = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_png_tensor_equals_the_training_normalisation() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = prepare(png_bytes(a), META, LIMITS)
    expected = normalize(torch.from_numpy(a).permute(2, 0, 1)[None], INFO.mean, INFO.std)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, expected)


def test_transparency_is_composited_on_white() -> None:
    a = np.zeros((8, 8, 4), dtype=np.uint8)
    a[:, :4] = (255, 0, 0, 255)  # opaque red left, fully transparent (black) right
    rgb = np.asarray(decode_image(png_bytes(a), LIMITS))
    assert (rgb[:, :4] == (255, 0, 0)).all() and (rgb[:, 4:] == 255).all()


def test_grayscale_palette_and_cmyk_become_rgb() -> None:
    gray = Image.fromarray(np.full((8, 8), 77, dtype=np.uint8))
    assert (np.asarray(decode_image(encode(gray), LIMITS)) == 77).all()
    rgb = Image.fromarray(np.full((8, 8, 3), (10, 200, 30), dtype=np.uint8))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    assert (np.asarray(decode_image(encode(pal), LIMITS)) == (10, 200, 30)).all()
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    out = decode_image(encode(pal_t), LIMITS)
    assert out.mode == "RGB" and (np.asarray(out) == 255).all()  # index 0 is the only colour, now transparent
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    r, g, b = np.asarray(decode_image(encode(cmyk, "JPEG", quality=95), LIMITS)).mean(axis=(0, 1))
    assert r > 200 and g < 60 and b < 60


def test_16bit_is_scaled_not_clipped() -> None:
    a = np.array([[0, 32896, 65535, 257]], dtype=np.uint16)
    img = Image.open(io.BytesIO(png_bytes(a)))
    assert img.mode.startswith("I")
    rgb = np.asarray(decode_image(png_bytes(a), LIMITS))
    assert rgb[0, :, 0].tolist() == [0, 128, 255, 1]


def test_exif_rotation_is_applied() -> None:
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, :20] = (255, 0, 0)  # left half red, right half blue
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    img = decode_image(encode(Image.fromarray(a), "JPEG", quality=95, exif=exif), LIMITS)
    assert img.size == (20, 40)
    top, bottom = np.asarray(img)[:10].mean(axis=(0, 1)), np.asarray(img)[30:].mean(axis=(0, 1))
    assert top[0] > 200 and bottom[2] > 200  # the left (red) half is now on top


def test_any_size_fits_the_input_and_resize_models_upsample() -> None:
    big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    assert prepare(encode(big), META, LIMITS).shape == (1, 3, 32, 32)
    x64 = to_tensor(big, {**META, "input_size": 64})
    assert x64.shape == (1, 3, 64, 64)


def test_animated_gif_uses_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(decode_image(buf.getvalue(), LIMITS))[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"hello, this is text", "not an image"),
        (NOISE_PNG[: len(NOISE_PNG) // 2], "truncated"),
        (b"GIF89a" + b"\x00" * 20, "image"),
    ],
)
def test_bad_bytes_are_422_with_a_reason(data: bytes, words: str) -> None:
    with pytest.raises(BadImage, match=words) as e:
        decode_image(data, LIMITS)
    assert not isinstance(e.value, PayloadTooLarge)


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    bomb = encode(Image.new("1", (20_000, 20_000)))  # 400 Mpixels, a few tens of kB compressed
    assert len(bomb) < 200_000
    t0 = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(bomb, LIMITS)
    assert time.perf_counter() - t0 < 0.5  # refused from the header, not after a full decode


def test_byte_limit() -> None:
    with pytest.raises(PayloadTooLarge, match="bytes"):
        decode_image(b"\x89PNG" + b"\x00" * 2000, ImageLimits(max_bytes=1024))


def test_refuses_formats_outside_the_allow_list() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
    with pytest.raises(BadImage, match="PNG"):
        decode_image(eps, LIMITS)


def test_base64_and_data_urls() -> None:
    raw = png_bytes(np.zeros((4, 4, 3), dtype=np.uint8))
    assert decode_base64(base64.b64encode(raw).decode()) == raw
    assert decode_base64("data:image/png;base64," + base64.b64encode(raw).decode()) == raw
    with pytest.raises(BadImage, match="image 3: not valid base64"):
        decode_base64("not base64!!", 3)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow narrates the damage it skips
def test_mutated_files_only_ever_decode_or_raise_bad_image() -> None:
    """Fuzz: flipped bytes and cuts in real PNG, JPEG, GIF, BMP and TIFF files never raise anything else."""
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    files = [encode(src, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF")]
    for i in range(400):
        data = bytearray(files[i % len(files)])
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if i % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        try:
            img = decode_image(bytes(data), LIMITS)
        except BadImage:
            continue
        assert img.mode == "RGB"
        assert to_tensor(img, META).shape == (1, 3, 32, 32)
