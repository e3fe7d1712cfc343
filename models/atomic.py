"""Atomic file writes (temp file in the same folder, fsync, rename) and file hashes; no torch, so the run store and
the job contract can use them in processes that never load a model."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from models.errors import DiskFull


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see all or nothing."""
    _atomic_via_temp(path, lambda tmp: Path(tmp).write_bytes(data))


def _raise_if_disk_full(e: BaseException, path: Path) -> None:
    """ENOSPC, however the writer reports it (OSError, safetensors' or torch's own errors): one clear error."""
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
        raise DiskFull(f"cannot write {path}: no space left on device; free space where it lives and retry") from e


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (indented, so people can read run.json and checkpoint metadata)."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def _atomic_via_temp(path: Path, write: Any) -> None:
    """Let `write(tmp_path)` produce the file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_disk_full(e, path)
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
