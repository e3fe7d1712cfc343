"""A corpus of hostile and odd images against every image endpoint of a real server, each with a timeout.

Every kind gets its documented refusal (413 too big, 415 wrong content type, 422 unreadable) or a correct 200
(checked against the same picture sent plainly where there is one to compare with); never a 5xx, never a hang.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from models.errors import BadImage
from service.errors import PayloadTooLarge
from service.images import ImageLimits, decode_image
from tests.helpers import Server

TIMEOUT = httpx.Timeout(60.0)
# (path, multipart field, query): every endpoint that takes an uploaded image.
ENDPOINTS = [
    ("/predict", "files", {}),
    ("/featuremaps", "file", {"format": "npy"}),
    ("/reconstruct", "file", {"format": "npy", "channels": "top:4"}),
    ("/explain", "file", {"format": "npy"}),
]
MAX_UPLOAD = 10 * 1024 * 1024  # the server's default max_upload_bytes


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height RGB, with one tiny compressed row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def sample() -> Image.Image:
    """A 32x32 picture with structure (a bright bar on one side), so rotations change what the model sees."""
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, :, 0] = np.arange(32, dtype=np.uint8)[None, :] * 8
    a[4:12, 2:30, 1] = 250
    a[20:30, 20:24, 2] = 200
    return Image.fromarray(a)


@dataclass
class Kind:
    """One hostile input: how to send it to an endpoint (field name -> response), and the statuses allowed."""

    name: str
    send: Callable[[httpx.Client, str, str, dict[str, str]], httpx.Response]
    ok: frozenset[int]
    same_as: bytes | None = None  # a 200 must equal the answer for these (PNG) bytes


def upload(data: bytes, filename: str = "x.png", ctype: str = "image/png") -> Callable[..., httpx.Response]:
    def send(c: httpx.Client, path: str, field: str, q: dict[str, str]) -> httpx.Response:
        return c.post(path, params=q, files={field: (filename, data, ctype)})

    return send


def raw(body: bytes, ctype: str) -> Callable[..., httpx.Response]:
    def send(c: httpx.Client, path: str, field: str, q: dict[str, str]) -> httpx.Response:
        return c.post(path, params=q, content=body, headers={"Content-Type": ctype})

    return send


def as_json(doc: Any) -> Callable[..., httpx.Response]:
    return raw(doc if isinstance(doc, bytes) else json.dumps(doc).encode(), "application/json")


OK, TOO_BIG, BAD, MEDIA = frozenset({200}), frozenset({413}), frozenset({422}), frozenset({415})


def corpus() -> list[Kind]:
    img = sample()
    png = encode(img, "PNG")
    jpeg = encode(img, "JPEG", quality=95)
    gray = img.convert("L")
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    frames = [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.new("RGB", (32, 32), "red")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the stored pixels are the upright ones turned left
    rotated = img.transpose(Image.Transpose.ROTATE_90)
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # 16-bit grayscale, same picture

    def many(field: str) -> bytes:
        part = f'Content-Disposition: form-data; name="{field}"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        return b"--b\r\n" + b"\r\n--b\r\n".join(part.encode() + png for _ in range(65)) + b"\r\n--b--\r\n"

    def too_many(c: httpx.Client, path: str, field: str, q: dict[str, str]) -> httpx.Response:
        """65 images in the endpoint's own field: over /predict's 64, and over the others' one."""
        return raw(many(field), "multipart/form-data; boundary=b")(c, path, field, q)

    rotated_jpeg = encode(rotated, "JPEG", quality=95, exif=exif)
    # The same decoded JPEG pixels, turned upright by hand: what the server must see after applying the EXIF tag.
    upright_of_jpeg = encode(Image.open(io.BytesIO(rotated_jpeg)).transpose(Image.Transpose.ROTATE_270), "PNG")
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"><rect/></svg>'
    html = b"<!DOCTYPE html><html><body><script>alert(1)</script><img src=x onerror=alert(1)></body></html>"
    return [
        Kind("empty file", upload(b""), BAD),
        Kind("truncated PNG", upload(png[: len(png) // 2]), BAD),
        Kind("truncated JPEG", upload(jpeg[: len(jpeg) // 2], "x.jpg", "image/jpeg"), BAD),
        Kind("PNG header only", upload(png[:33]), BAD),
        Kind("PNG named .jpg, sent as image/jpeg", upload(png, "photo.jpg", "image/jpeg"), OK, png),
        Kind("PNG sent as text/plain part", upload(png, "notes.txt", "text/plain"), OK, png),
        Kind("decompression bomb: header claims 100000x100000", upload(png_claiming(100_000, 100_000)), TOO_BIG),
        Kind("header claims 5000x5000 with 1 row of data", upload(png_claiming(5000, 5000)), TOO_BIG),
        Kind("10000x10000 real PNG", upload(encode(Image.new("L", (10_000, 10_000)), "PNG")), TOO_BIG),
        Kind("1x1", upload(encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")), OK),
        Kind("1x4000 sliver", upload(encode(Image.new("RGB", (1, 4000), "blue"), "PNG")), OK),
        Kind("16-bit grayscale PNG", upload(encode(sixteen, "PNG")), OK, encode(gray, "PNG")),
        Kind("CMYK JPEG", upload(encode(img.convert("CMYK"), "JPEG"), "x.jpg", "image/jpeg"), OK),
        Kind("palette with transparency", upload(encode(pal, "PNG")), OK),
        Kind("RGBA half transparent", upload(encode(rgba, "PNG")), OK),
        Kind("animated GIF (first frame)", upload(gif.getvalue(), "a.gif", "image/gif"), OK, png),
        Kind("SVG disguised as PNG", upload(svg), BAD),
        Kind("HTML disguised as PNG", upload(html), BAD),
        Kind("EPS (a format we refuse)", upload(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n"), BAD),
        Kind("PDF", upload(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"), BAD),
        Kind("random bytes", upload(np.random.default_rng(1).bytes(5000)), BAD),
        Kind("PNG with garbage IDAT", upload(png[:41] + b"\xff" * 200 + png[-12:]), BAD),
        Kind("EXIF-rotated PNG", upload(encode(rotated, "PNG", exif=exif)), OK, png),
        Kind("EXIF-rotated JPEG", upload(rotated_jpeg, "r.jpg", "image/jpeg"), OK, upright_of_jpeg),
        Kind("grayscale", upload(encode(gray, "PNG")), OK, encode(gray.convert("RGB"), "PNG")),
        Kind("LA", upload(encode(img.convert("LA"), "PNG")), OK),
        Kind("1-bit", upload(encode(img.convert("1"), "PNG")), OK),
        Kind("BMP", upload(encode(img, "BMP"), "x.bmp", "image/bmp"), OK, png),
        Kind("TIFF", upload(encode(img, "TIFF"), "x.tif", "image/tiff"), OK, png),
        Kind("float TIFF (mode F)", upload(encode(Image.fromarray(np.asarray(gray) / 255.0), "TIFF")), OK),
        Kind("lossless WebP", upload(encode(img, "WEBP", lossless=True), "x.webp", "image/webp"), OK, png),
        Kind("PPM", upload(encode(img, "PPM"), "x.ppm", "image/x-portable-pixmap"), OK, png),
        Kind("progressive JPEG", upload(encode(img, "JPEG", progressive=True), "p.jpg", "image/jpeg"), OK),
        Kind("zero-length multipart body", raw(b"", "multipart/form-data; boundary=b"), BAD),
        Kind("multipart with no parts", raw(b"--b--\r\n", "multipart/form-data; boundary=b"), BAD),
        Kind("multipart without a boundary", raw(b"--b--\r\n", "multipart/form-data"), BAD),
        Kind("multipart, image in the wrong field", lambda c, p, f, q: c.post(p, params=q, files={"x": png}), BAD),
        Kind("multipart, 65 images", too_many, TOO_BIG),
        Kind("body over max_upload_bytes", upload(b"\x89PNG" + b"\0" * (MAX_UPLOAD + 10)), TOO_BIG),
        Kind("huge base64 JSON", as_json({"images": ["A" * (MAX_UPLOAD + 4)]}), TOO_BIG),
        Kind("base64 of PNG", as_json({"images": [base64.b64encode(png).decode()]}), OK, png),
        Kind("data: URL", as_json({"images": ["data:image/png;base64," + base64.b64encode(png).decode()]}), OK, png),
        Kind("non-base64 JSON string", as_json({"images": ["not base64!!"]}), BAD),
        Kind("base64 of text", as_json({"images": [base64.b64encode(b"hello").decode()]}), BAD),
        Kind("JSON: images not a list", as_json({"images": "abc"}), BAD),
        Kind("JSON: numbers", as_json({"images": [1, 2]}), BAD),
        Kind("JSON: a list at the top", as_json([base64.b64encode(png).decode()]), BAD),
        Kind("JSON: empty list", as_json({"images": []}), BAD),
        Kind("JSON: null", as_json(b"null"), BAD),
        Kind("JSON: not JSON", as_json(b"{images:"), BAD),
        Kind("JSON: not UTF-8", as_json(b'{"images": ["\xff\xfe"]}'), BAD),
        Kind("JSON: 10,000-deep nesting", as_json(b"[" * 10_000 + b"]" * 10_000), BAD),
        Kind("body as text/plain", raw(png, "text/plain"), MEDIA),
        Kind("no content type", lambda c, p, f, q: c.post(p, params=q, content=png), MEDIA),
    ]


CORPUS = corpus()


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 40 and len({k.name for k in CORPUS}) == len(CORPUS)


def _answer(r: httpx.Response) -> Any:
    if r.headers["content-type"].startswith("application/json"):
        body = r.json()
        for p in body.get("predictions", []):
            p.pop("filename", None)
        return body
    return np.load(io.BytesIO(r.content))


def _close(a: Any, b: Any, tol: float) -> bool:
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and bool(np.allclose(a, b, atol=tol * max(1.0, float(np.abs(b).max()))))
    pa = [[s["probability"] for s in p["top_k"]] for p in a["predictions"]]
    pb = [[s["probability"] for s in p["top_k"]] for p in b["predictions"]]
    ia = [[s["index"] for s in p["top_k"]][:1] for p in a["predictions"]]
    ib = [[s["index"] for s in p["top_k"]][:1] for p in b["predictions"]]
    return ia == ib and bool(np.allclose(pa, pb, atol=tol))


@pytest.mark.parametrize(("path", "field", "query"), ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
def test_hostile_images(server: Server, path: str, field: str, query: dict[str, str]) -> None:
    wrong: list[str] = []
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        for kind in CORPUS:
            try:
                r = kind.send(c, path, field, query)
            except httpx.TimeoutException:
                wrong.append(f"{kind.name}: no answer within {TIMEOUT.read}s")
                continue
            except httpx.TransportError as e:
                wrong.append(f"{kind.name}: no answer ({type(e).__name__}: {e})")
                continue
            expected = kind.ok
            if r.status_code not in expected:
                wrong.append(f"{kind.name}: {r.status_code} {r.text[:200]!r}, expected {sorted(expected)}")
                continue
            if r.status_code != 200:
                assert r.headers["content-type"].startswith("application/json"), kind.name
                detail = r.json()["detail"]
                if not (isinstance(detail, str) and len(detail) > 10):
                    wrong.append(f"{kind.name}: unhelpful detail {detail!r}")
                continue
            if kind.same_as is not None:
                plain = upload(kind.same_as)(c, path, field, query)
                assert plain.status_code == 200, plain.text
                if not _close(_answer(r), _answer(plain), 1e-5):
                    wrong.append(f"{kind.name}: 200 but a different answer than the plain image's")
    assert not wrong, "\n".join(wrong)
    # The server is still healthy after the whole corpus.
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_exif_rotation_changes_the_answer(server: Server) -> None:
    """The EXIF comparison above can fail: the same rotated pixels without the tag give another answer."""
    img = sample()
    rotated = encode(img.transpose(Image.Transpose.ROTATE_90), "PNG")
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        q = {"format": "npy", "layer": "conv1"}
        a = np.load(io.BytesIO(upload(rotated)(c, "/featuremaps", "file", q).content))
        b = np.load(io.BytesIO(upload(encode(img, "PNG"))(c, "/featuremaps", "file", q).content))
    assert a.shape == b.shape and not np.allclose(a, b, atol=1e-3)


def test_pixel_limit_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 10000x10000 PNG is refused from its header: Pillow's pixel decoder never runs (a spy counts its calls)."""
    from PIL import ImageFile

    data = encode(Image.new("L", (10_000, 10_000)), "PNG")
    loads: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> Any:
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(data, ImageLimits(max_bytes=MAX_UPLOAD, max_pixels=16_000_000))
    assert loads == []
    # The spy does see decoding when it happens (grey with alpha: plain grey would take service.png's fast path,
    # which checks the same limit first: tests/service/test_png.py).
    decode_image(encode(Image.new("LA", (64, 64)), "PNG"), ImageLimits(max_bytes=MAX_UPLOAD, max_pixels=16_000_000))
    assert loads and set(loads) == {(64, 64)}
    with pytest.raises(BadImage):  # and a truncated file within the limit is a plain 422
        decode_image(data[: len(data) // 2], ImageLimits(max_bytes=MAX_UPLOAD, max_pixels=200_000_000))


def test_refusals_before_the_body_is_read_still_reach_the_client(server: Server) -> None:
    """415 (content type), 404 (model) and 422 (query) are decided before the body is read; the client, still
    sending, must get them and not a connection reset, and the kept-alive connection must stay usable."""
    body = np.random.default_rng(2).bytes(512 * 1024)
    seen: list[int | str] = []
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        for i in range(30):
            path, params, ctype = [
                ("/predict", {}, "text/plain"),
                ("/featuremaps", {"model": "no-such-model"}, "image/png"),
                ("/reconstruct", {"layer": "nope"}, "application/octet-stream"),
            ][i % 3]
            try:
                seen.append(c.post(path, params=params, content=body, headers={"Content-Type": ctype}).status_code)
            except httpx.TransportError as e:
                seen.append(type(e).__name__)
    assert set(seen) <= {415, 404, 422}, seen


def test_deeply_nested_json_anywhere_is_a_4xx(server: Server) -> None:
    """json.loads raises RecursionError (not ValueError) past ~1000 levels: every JSON we parse must survive it."""
    png = encode(sample(), "PNG")
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        r = c.post("/explain", params={"params": "[" * 2000 + "]" * 2000}, files={"file": ("a.png", png)})
        assert r.status_code == 422 and "params" in r.json()["detail"], r.text
        r = c.post("/train", content=b"[" * 50_000 + b"]" * 50_000, headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422), r.text
        for path in ("/predict", "/featuremaps"):
            r = c.post(path, content=b'{"images": ' + b"[" * 50_000, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, r.text
