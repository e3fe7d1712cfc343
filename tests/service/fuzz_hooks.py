"""What schemathesis cannot know from the schema alone: what a real image is.

The schema says an upload is an image file (multipart parts are `image/png, image/jpeg, image/gif, image/webp`)
and that the JSON form's strings have the format `base64-image`. This registers both: real files of each media
type, and base64 of small real images, so positive cases carry images the server must accept. Load it in the CLI with
`SCHEMATHESIS_HOOKS=tests.service.fuzz_hooks schemathesis run ...`; tests/service/test_fuzz.py imports it.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _image(side: int, mode: str, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _encoded(side: int, mode: str, fmt: str, seed: int) -> str:
    return base64.b64encode(_image(side, mode, fmt, seed)).decode("ascii")


# Multipart file parts: the schema's `encoding` names these content types; each gets real files of its format.
for media_type, fmt in (("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/gif", "GIF"), ("image/webp", "WEBP")):
    files = [_image(side, "RGB", fmt, side) for side in (1, 16, 32, 48)]
    schemathesis.openapi.media_type(media_type, st.sampled_from(files))

SAMPLES = [
    _encoded(side, mode, fmt, i)
    for i, (side, mode, fmt) in enumerate(
        [
            (32, "RGB", "PNG"),
            (1, "L", "PNG"),
            (17, "RGB", "JPEG"),
            (32, "P", "GIF"),
            (48, "RGB", "WEBP"),
            (8, "RGBA", "PNG"),
        ]
    )
]
schemathesis.openapi.format("base64-image", st.sampled_from(SAMPLES))
