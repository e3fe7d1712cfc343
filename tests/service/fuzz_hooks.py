"""What schemathesis cannot know from the schema alone: what a real image is.

The schema says an upload is an image file (multipart parts are `image/png, image/jpeg, image/gif, image/webp`,
which schemathesis fills with its own small sample files) and that the JSON form's strings have the format
`base64-image`. This registers that format: base64 of small real images in every format the schema names, so
positive cases carry images the server must accept. Load it in the CLI with
`SCHEMATHESIS_HOOKS=tests.service.fuzz_hooks schemathesis run ...`; tests/service/test_fuzz.py imports it.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _encoded(side: int, mode: str, fmt: str, seed: int) -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


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
