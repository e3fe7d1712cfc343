"""The PNG fast path (service.png): Pillow's own pixels where it answers, the full path's say everywhere else."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service.images import ImageLimits, decode_image
from service.png import decode_png

MAX_PIXELS = ImageLimits().max_pixels
RNG = np.random.default_rng(0)


def save(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def pillow_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    """The PNG with one more chunk right after IHDR (8 bytes of signature + 25 of IHDR)."""
    return png[:33] + chunk(kind, body) + png[33:]


def split_at_idat(png: bytes) -> tuple[bytes, bytes, bytes]:
    """(what precedes the first IDAT chunk, its body, what follows it)."""
    start = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[start : start + 4])
    return png[:start], png[start + 8 : start + 8 + length], png[start + 12 + length :]


def noise(h: int, w: int, mode: str = "RGB") -> Image.Image:
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(RNG.integers(0, 256, shape, dtype=np.uint8))


FAST = {
    "cifar-like 32x32": save(noise(32, 32)),
    "one pixel": save(noise(1, 1)),
    "wide 7x300": save(noise(7, 300)),
    "grey": save(noise(20, 33, "L")),
    "flat colour (long runs)": save(Image.new("RGB", (64, 48), (10, 200, 30))),
    "no compression": save(noise(16, 16), compress_level=0),
    "optimized": save(noise(16, 16), optimize=True),
    "with chunks Pillow skips (sBIT, bKGD, tIME)": with_chunk(
        with_chunk(with_chunk(save(noise(12, 12)), b"sBIT", b"\x08\x08\x08"), b"bKGD", b"\0\1\0\2\0\3"),
        b"tIME",
        b"\x07\xea\x0c\x07\x08\x00\x00",
    ),
}


@pytest.mark.parametrize("name", list(FAST))
def test_fast_path_pixels_equal_pillows(name: str) -> None:
    data = FAST[name]
    img = decode_png(data, MAX_PIXELS)
    assert img is not None, "this file should take the fast path"
    assert np.array_equal(np.asarray(img.convert("RGB")), pillow_pixels(data))
    assert np.array_equal(np.asarray(decode_image(data, ImageLimits())), pillow_pixels(data))


def test_idat_split_over_many_chunks_is_joined() -> None:
    png = save(noise(30, 30))
    head, body, tail = split_at_idat(png)
    data = head + b"".join(chunk(b"IDAT", body[i : i + 50]) for i in range(0, len(body), 50)) + tail
    img = decode_png(data, MAX_PIXELS)
    assert img is not None and np.array_equal(np.asarray(img), pillow_pixels(data))


def apng() -> bytes:
    frames = [noise(8, 8), noise(8, 8)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def text_png() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    return save(noise(8, 8), pnginfo=info)


FULL_PATH = {
    "RGBA": save(noise(8, 8).convert("RGBA")),
    "palette": save(noise(8, 8).convert("P")),
    "16-bit grey": save(Image.fromarray(RNG.integers(0, 65535, (8, 8), dtype=np.uint16))),
    "transparency (tRNS)": save(noise(8, 8), transparency=(0, 0, 0)),
    "EXIF (eXIf)": with_chunk(save(noise(8, 8)), b"eXIf", b"MM\0*\0\0\0\x08\0\0"),
    "text (Pillow reads EXIF from text too)": text_png(),
    "animated (APNG)": apng(),
    "an unknown chunk": with_chunk(save(noise(8, 8)), b"zzZz", b"x"),
    "dpi and an ICC profile (chunks Pillow reads)": save(noise(12, 12), dpi=(72, 72), icc_profile=b"\0" * 200),
    "gAMA (Pillow reads it; a short one makes it refuse the file)": with_chunk(save(noise(9, 9)), b"gAMA", b"\0"),
    "a broken CRC (IHDR's last byte flipped)": bytes(
        b ^ 0xFF if i == 32 else b for i, b in enumerate(save(noise(8, 8)))
    ),
    "truncated": save(noise(8, 8))[:-20],
    "JPEG": b"\xff\xd8\xff\xe0" + b"\0" * 50,
    "empty": b"",
}


@pytest.mark.parametrize("name", list(FULL_PATH))
def test_everything_else_goes_to_the_full_path(name: str) -> None:
    assert decode_png(FULL_PATH[name], MAX_PIXELS) is None


def test_the_pixel_limit_sends_it_to_the_full_path() -> None:
    data = save(noise(10, 10))
    assert decode_png(data, 99) is None and decode_png(data, 100) is not None


def test_interlaced_goes_to_the_full_path() -> None:
    png = save(noise(8, 8))
    ihdr = bytearray(png[16:29])
    ihdr[12] = 1  # Adam7
    data = png[:8] + chunk(b"IHDR", bytes(ihdr)) + png[33:]
    assert decode_png(data, MAX_PIXELS) is None


def refresh_crcs(data: bytearray) -> bytes:
    """The file with every whole chunk's CRC recomputed, so that damage inside a chunk passes the CRC check."""
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        if end > len(data):
            break
        data[end - 4 : end] = struct.pack(">I", zlib.crc32(bytes(data[pos + 4 : end - 4])))
        pos = end
    return bytes(data)


def damage_pixels(png: bytes, rng: np.random.Generator) -> bytes:
    """The file with bytes of its inflated IDAT stream (filter types and filtered pixels) changed, then deflated
    and checksummed again: damage that passes every check before the decoder's own."""
    head, body, tail = split_at_idat(png)
    raw = bytearray(zlib.decompress(body))
    for _ in range(int(rng.integers(1, 4))):
        raw[int(rng.integers(0, len(raw)))] = int(rng.integers(0, 256))
    return head + chunk(b"IDAT", zlib.compress(bytes(raw))) + tail


MUTATIONS = ["raw", "crcs-recomputed", "inflated-data"]


@pytest.mark.parametrize("how", MUTATIONS)
def test_mutated_pngs_either_fall_back_or_equal_pillow(how: str) -> None:
    """Fuzz: changed and cut bytes never raise from the fast path, and what it answers Pillow answers alike.
    `raw` mostly trips the CRCs; with them recomputed the damage reaches the header fields and the zlib stream;
    `inflated-data` changes filter types and pixels behind a valid stream, so most files decode and compare."""
    rng = np.random.default_rng(1)
    sources = [FAST["cifar-like 32x32"], FAST["grey"], FAST["with chunks Pillow skips (sBIT, bKGD, tIME)"]]
    answered = 0
    for i in range(1500):
        source = sources[i % len(sources)]
        if how == "inflated-data":
            mutated = damage_pixels(source, rng)
        else:
            data = bytearray(source)
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(8, len(data)))] = int(rng.integers(0, 256))
            if i % 4 == 0:
                data = data[: int(rng.integers(1, len(data)))]
            mutated = refresh_crcs(data) if how == "crcs-recomputed" else bytes(data)
        img = decode_png(mutated, MAX_PIXELS)
        if img is not None:
            answered += 1
            assert np.array_equal(np.asarray(img.convert("RGB")), pillow_pixels(mutated))
    if how == "inflated-data":
        assert answered > 1000  # a bad filter type is refused by both; changed pixels decode: compared above
