"""Uploaded bytes -> an RGB PIL image -> the normalised tensor a checkpoint's eval transform expects."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from models.data import normalize
from models.errors import BadImage
from service.errors import PayloadTooLarge, UnsupportedMediaType
from service.png import decode_png

# Formats we decode. Others Pillow knows (EPS runs Ghostscript, for one) are refused rather than trusted.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
# CIFAR images are 32x32; a checkpoint with a larger input_size was trained on them upsampled (cfg.resize).
DATASET_IMAGE_SIZE = 32
ORIENTATION = 0x0112  # the EXIF tag
# Pillow warns past its own pixel limit; ours (checked from the header) is lower and raises a clear error.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageLimits:
    """What one upload may cost: its bytes and its pixels (read from the header, before decoding)."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 16_000_000


def decode_base64(text: str, index: int = 0) -> bytes:
    """Base64 (optionally a `data:image/...;base64,` URL) -> bytes, or BadImage naming the item."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadImage(f"image {index}: not valid base64 ({e}); send the file's bytes base64-encoded") from e


def decode_image(data: bytes, limits: ImageLimits, draft: int | None = None, name: str = "image") -> Image.Image:
    """Bytes -> an upright RGB image; BadImage (422) or PayloadTooLarge (413) for anything we cannot take.

    `draft` lets JPEG decode at a reduced scale no smaller than draft x draft (much cheaper for big photos).
    Pillow, not torchvision.io.decode_png, though that decodes a 32x32 PNG in about half the time: torchvision
    0.29.1's decode_png kills the process (SIGSEGV) on a PNG whose IDAT fails its zlib check, one flipped byte in.
    """
    if not data:
        raise BadImage(f"{name} is empty (0 bytes); send the image file's contents")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{name} is {len(data):,} bytes; the limit is {limits.max_bytes:,}")
    fast = decode_png(data, limits.max_pixels)
    if fast is not None:
        return to_rgb(fast)
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as e:
        raise BadImage(f"{name} is not an image we can read; send one of: {', '.join(FORMATS)}") from e
    except Image.DecompressionBombError as e:
        raise PayloadTooLarge(f"{name} has too many pixels: {e}") from e
    except Exception as e:  # a malformed header can raise nearly anything; it is the client's input either way
        raise BadImage(f"{name} has a corrupt header ({type(e).__name__}: {e})") from e
    w, h = img.size
    if w * h > limits.max_pixels:
        raise PayloadTooLarge(f"{name} is {w}x{h} = {w * h:,} pixels; the limit is {limits.max_pixels:,}")
    if w < 1 or h < 1:
        raise BadImage(f"{name} has no pixels ({w}x{h})")
    try:
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        img.load()
    except Exception as e:  # truncated data raises OSError, other corruptions other types: all are 422
        raise BadImage(
            f"{name} could not be decoded ({type(e).__name__}: {e}); the file may be truncated or corrupt"
        ) from e
    upright: Image.Image = img
    with contextlib.suppress(Exception):  # an unreadable EXIF block: keep the pixels as stored, not refuse them
        if img.getexif().get(ORIENTATION, 1) != 1:  # checked first: exif_transpose copies even upright images
            upright = ImageOps.exif_transpose(img) or img
    try:
        return to_rgb(upright)
    except Exception as e:
        raise BadImage(f"{name} has colour mode {img.mode!r}, which we cannot convert to RGB") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB: 16-bit and float scaled (not clipped), transparency composited on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's convert() clips 16-bit values at 255 (a near-white image); scale the full range instead.
        a = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        a = a * 255.0 if a.size and a.max() <= 1.0 else a  # float images are usually in [0, 1]
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def fit(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and crop the centre square (torchvision's Resize + CenterCrop)."""
    if img.size == (size, size):
        return img
    return ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)


def to_uint8(img: Image.Image, meta: Mapping[str, Any]) -> torch.Tensor:
    """An RGB image -> uint8 (3, s, s) at the dataset's image size (the eval transform's PIL half)."""
    native = int(meta.get("image_size", DATASET_IMAGE_SIZE))
    # Contiguous NCHW: batches of one and of many then take the same kernels (and give the same numbers).
    return torch.from_numpy(np.array(fit(img, native), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def normalize_batch(x: torch.Tensor, meta: Mapping[str, Any]) -> torch.Tensor:
    """uint8 (N, 3, s, s) -> the float32 network input (N, 3, H, W): the eval transform's tensor half."""
    x = normalize(x, tuple(meta["mean"]), tuple(meta["std"]))
    size = int(meta.get("input_size", x.shape[-1]))
    if size != x.shape[-1]:
        # Training upsampled the normalised 32x32 batch exactly this way (models.data.DeviceLoader).
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def to_tensor(img: Image.Image, meta: Mapping[str, Any]) -> torch.Tensor:
    """An RGB image -> float32 (1, 3, H, W) as the checkpoint's eval transform makes it."""
    return normalize_batch(to_uint8(img, meta).unsqueeze(0), meta)


def prepare_uint8(data: bytes, meta: Mapping[str, Any], limits: ImageLimits, name: str = "image") -> torch.Tensor:
    """Bytes -> uint8 (3, s, s): decode, convert and fit, leaving normalisation to be done per batch."""
    native = int(meta.get("image_size", DATASET_IMAGE_SIZE))
    return to_uint8(decode_image(data, limits, draft=native, name=name), meta)


def prepare(data: bytes, meta: Mapping[str, Any], limits: ImageLimits, name: str = "image") -> torch.Tensor:
    """Bytes -> the model's input tensor (1, 3, H, W): decode, convert, fit and normalise."""
    return normalize_batch(prepare_uint8(data, meta, limits, name).unsqueeze(0), meta)


# ---- request bodies: the images of a multipart or JSON upload ----------------------------------------------------


@dataclass
class Upload:
    """One uploaded image's bytes and, for multipart, its file name."""

    data: bytes
    filename: str | None = None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole request body, refused with 413 as soon as it passes `max_bytes` (before buffering more)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the request body is {int(declared):,} bytes; the limit is {max_bytes:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"the request body passed the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_multipart(body: bytes, content_type: str, field_name: str, max_files: int) -> list[Upload]:
    """The files of one form field, in order, parsed in memory (the body is already size-checked)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadImage("multipart body without a boundary; let your HTTP client build the multipart request")
    uploads: list[Upload] = []
    part: dict[str, Any] = {}
    header = [b"", b""]

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, data=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        part["headers"][header[0].lower()] = header[1]
        header[0], header[1] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["data"] += data[start:end]

    def on_part_end() -> None:
        _, opts = parse_options_header(part["headers"].get(b"content-disposition"))
        if opts.get(b"name", b"").decode("utf-8", "replace") != field_name:
            return  # other form fields are not ours to read
        if len(uploads) >= max_files:
            raise PayloadTooLarge(f"more than {max_files} images in one request; send them in several requests")
        filename = opts.get(b"filename")
        uploads.append(Upload(bytes(part["data"]), filename.decode("utf-8", "replace") if filename else None))

    callbacks: Any = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except PayloadTooLarge:
        raise  # from our own callback (a ValueError too)
    except (FormParserError, ValueError) as e:
        raise BadImage(f"malformed multipart body ({e}); send the images as form field {field_name!r}") from e
    return uploads


def parse_json_images(body: bytes, max_images: int) -> list[Upload]:
    """`{"images": ["<base64>", ...]}` -> uploads."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: [[[[... thousands deep
        raise BadImage(f'the JSON body does not parse ({e}); send {{"images": ["<base64>", ...]}}') from e
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise BadImage('the JSON body needs "images": a list of base64 strings')
    if len(images) > max_images:
        raise PayloadTooLarge(f"{len(images)} images in one request; the limit is {max_images}")
    return [Upload(decode_base64(s, i)) for i, s in enumerate(images)]


async def read_uploads(request: Request, max_bytes: int, max_images: int, field_name: str = "files") -> list[Upload]:
    """The images of a request: multipart files in `field_name`, or JSON base64; at least one, at most max_images."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise UnsupportedMediaType(
            f"content type {kind or 'none'!r} is not accepted; send multipart/form-data with the images in field "
            f'{field_name!r}, or application/json {{"images": ["<base64>", ...]}}'
        )
    body = await read_body(request, max_bytes)
    if kind == "application/json":
        uploads = parse_json_images(body, max_images)
    else:
        uploads = parse_multipart(body, content_type, field_name, max_images)
    if not uploads:
        raise BadImage(f"no images in the request; send one or more files in the form field {field_name!r}")
    return uploads


def image_request_body(field: str, many: bool, json_schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI `requestBody` for an endpoint reading images with read_uploads: multipart `field` or JSON base64."""
    binary = {"type": "string", "format": "binary"}
    prop = (
        {
            "type": "array",
            "items": binary,
            "minItems": 1,
            "description": "one or more image files (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM)",
        }
        if many
        else {**binary, "description": "one image file"}
    )
    multipart = {"type": "object", "required": [field], "properties": {field: prop}}
    form = {"schema": multipart, "encoding": {field: {"contentType": IMAGE_CONTENT_TYPES}}}
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": form, "application/json": {"schema": json_schema}},
        }
    }


# What a file part may be, as the schema states it (the decoder reads more: BMP, TIFF, PPM).
IMAGE_CONTENT_TYPES = "image/png, image/jpeg, image/gif, image/webp"
# The JSON form's image strings: base64 of an image file. A named format, so that a schema fuzzer can be taught to
# make real images (tests/service/fuzz_hooks.py) where it would otherwise send any base64 text.
BASE64_IMAGE = {"type": "string", "format": "base64-image", "minLength": 1}
