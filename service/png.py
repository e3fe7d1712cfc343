"""The commonest upload, an 8-bit RGB or grey PNG, decoded without the Python half of Pillow's PNG plugin.

Under load the event loop limits /predict, and for a 32x32 PNG Pillow spends longer in its plugin's Python
(sniffing formats, parsing chunk by chunk, building an ImageFile) than in the C that inflates and unfilters the
pixels. Here the chunks are walked in a few lines (lengths bounded, every CRC checked) and the IDAT stream goes
to the same C decoder the plugin uses (`Image.frombytes(..., "zip", rawmode)`), so the pixels are Pillow's own.

Only files the full path cannot answer otherwise take it: 8-bit grey or RGB, not interlaced, and besides IHDR, one
run of IDAT and IEND only chunks the plugin skips unread. Every chunk it reads could change the answer: transparency,
a palette, EXIF orientation (which Pillow also reads from text chunks), animation, and even gamma or an ICC profile,
whose malformed forms make Pillow refuse the file. Anything else, and every file that fails a check, returns None:
the caller then takes the full Pillow path, which decides and words the error.
"""

from __future__ import annotations

import struct
import zlib

from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Colour type -> Pillow mode (8-bit only).
MODES = {0: "L", 2: "RGB"}
# Ancillary chunks Pillow's PNG plugin skips unread (it has no handler for them), so no content of theirs matters.
SKIPPED = frozenset({b"sBIT", b"bKGD", b"tIME", b"hIST", b"sPLT"})
_LENGTH_TYPE = struct.Struct(">I4s")
_IHDR = struct.Struct(">IIBBBBB")


def decode_png(data: bytes, max_pixels: int) -> Image.Image | None:
    """A PNG's pixels as an "L" or "RGB" image, or None where the full Pillow path must decide."""
    if not data.startswith(SIGNATURE):
        return None
    chunks = _chunks(data)
    if chunks is None or not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        return None
    width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack(chunks[0][1])
    mode = MODES.get(colour)
    if mode is None or depth != 8 or (compression, filtering, interlace) != (0, 0, 0):
        return None
    if not 0 < width * height <= max_pixels:
        return None
    idat = _image_data(chunks[1:])
    if idat is None:
        return None
    try:
        return Image.frombytes(mode, (width, height), idat, "zip", mode)
    except (ValueError, OSError, zlib.error):  # truncated or corrupt: the full path says which
        return None


def _chunks(data: bytes) -> list[tuple[bytes, memoryview]] | None:
    """(type, body) of each chunk up to IEND, or None if one runs past the end or fails its CRC."""
    view, pos = memoryview(data), len(SIGNATURE)
    out: list[tuple[bytes, memoryview]] = []
    while pos + 12 <= len(data):
        length, kind = _LENGTH_TYPE.unpack_from(data, pos)
        end = pos + 12 + length
        if end > len(data) or zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end]):
            return None
        if kind == b"IEND":
            return out
        out.append((kind, view[pos + 8 : end - 4]))
        pos = end
    return None  # no IEND: truncated


def _image_data(chunks: list[tuple[bytes, memoryview]]) -> bytes | None:
    """The IDAT stream, if the chunks after IHDR are skipped ones and one run of IDATs, else None."""
    kinds = [kind for kind, _ in chunks]
    if b"IDAT" not in kinds:
        return None
    first = kinds.index(b"IDAT")
    last = len(kinds) - kinds[::-1].index(b"IDAT")
    if any(k not in SKIPPED for k in kinds[:first] + kinds[last:]) or any(k != b"IDAT" for k in kinds[first:last]):
        return None
    return b"".join(body for _, body in chunks[first:last])
