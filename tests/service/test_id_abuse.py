"""Path and id abuse: traversal strings, absolute paths and overlong ids in every id position get 404/422 (405
where the mangled URL names no route), never a 2xx or a 5xx, and nothing on disk changes outside the run store.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.helpers import link_copy, png_bytes
from tests.service.conftest import make_client

BAD_IDS = [
    "..",
    ".",
    "../tiny",
    "../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "tiny/../tiny",
    "/etc/passwd",
    "//etc/passwd",
    "C:\\Windows\\System32",
    "~root",
    "tiny\x00",
    "tiny%00",
    "tiny\n",
    "tiny ",
    " tiny",
    "-tiny",
    "_tiny",
    "ｔｉｎｙ",  # fullwidth letters: NFKC would fold them to "tiny"
    "tiny.json",
    "tiny/checkpoints/best",
    "a" * 65,
    "a" * 10_000,
    "%2e%2e%2f%2e%2e%2fetc",
    "$(touch x)",
    "'; DROP TABLE runs; --",
]
REFUSED = {404, 405, 422}


@pytest.fixture
def world(trained_home: Path, synthetic_data: Path, tmp_path: Path) -> tuple[TestClient, Path, Path]:
    """A client over a private run store, beside a folder outside it that must stay untouched."""
    home = link_copy(trained_home, tmp_path / "home")
    outside = tmp_path / "outside"
    (outside / "runs" / "victim").mkdir(parents=True)
    (outside / "runs" / "victim" / "run.json").write_text('{"id": "victim", "status": "queued"}')
    return make_client(home, synthetic_data), home, outside


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def forms(bad: str) -> list[str]:
    """The id percent-encoded (reaches the app as is), and raw unless the client would resolve its dot segments
    into another URL (`/models/tiny/../tiny` is sent as `/models/tiny`: not the server's doing)."""
    raw = [] if any(seg in (".", "..") for seg in bad.split("/")) else [bad]
    return list(dict.fromkeys([*raw, quote(bad, safe="").replace(".", "%2E")]))  # dots too: quote keeps them


def test_every_id_position_refuses_abuse(world: tuple[TestClient, Path, Path]) -> None:
    client, home, outside = world
    png = png_bytes(np.zeros((32, 32, 3), np.uint8))
    before_home, before_out = snapshot(home / "runs"), snapshot(outside)
    wrong: list[str] = []
    with client as c:

        def expect(method: str, url: str, **kw: object) -> None:
            try:
                r = c.request(method, url, **kw)  # type: ignore[arg-type]
            except Exception as e:  # the client itself refusing a URL is not the server's doing
                if "Invalid" in type(e).__name__ or "URL" in str(e):
                    return
                raise
            if r.status_code not in REFUSED:
                wrong.append(f"{method} {url[:120]!r}: {r.status_code} {r.text[:120]!r}")

        for bad in BAD_IDS:
            for s in forms(bad):
                for path in ("/models/{}", "/models/{}/confusion.png", "/jobs/{}", "/jobs/{}/metrics"):
                    expect("GET", path.format(s))
                expect("GET", f"/jobs/{s}/curves.png")
                expect("GET", f"/jobs/{s}/events", params={"heartbeat": 1})
                expect("POST", f"/models/{s}/default")
                expect("DELETE", f"/jobs/{s}")
            # model= on every model-backed endpoint, run_id= on POST /train (values go in the query, as is).
            expect("POST", "/predict", params={"model": bad}, files={"files": ("a.png", png)})
            expect("POST", "/featuremaps", params={"model": bad}, files={"file": ("a.png", png)})
            expect("POST", "/reconstruct", params={"model": bad}, files={"file": ("a.png", png)})
            expect("POST", "/explain", params={"model": bad}, files={"file": ("a.png", png)})
            expect("GET", "/filters", params={"model": bad})
            expect("GET", "/topk", params={"model": bad})
            expect("POST", "/train", params={"run_id": bad}, json={"epochs": 1})
        # The legitimate id still works, so the refusals above are about the ids, not a broken client.
        assert c.get("/models/tiny").status_code == 200 and c.get("/jobs/tiny").status_code == 200
        assert c.get("/filters", params={"model": "tiny"}).status_code == 200
    assert not wrong, "\n".join(wrong)
    assert snapshot(outside) == before_out
    after_home = snapshot(home / "runs")
    assert set(after_home) == set(before_home), set(after_home) ^ set(before_home)  # no run created anywhere
    assert not (home.parent / "etc").exists() and not (home / "etc").exists()
    assert sorted(p.name for p in (home / "runs").iterdir()) == ["tiny"]


def test_registry_never_reads_outside_the_store(world: tuple[TestClient, Path, Path]) -> None:
    """A run.json planted next to the store is not reachable by any spelling of its path."""
    client, _, outside = world
    with client as c:
        for s in ("../outside/runs/victim", "..%2F..%2Foutside%2Fruns%2Fvictim", str(outside / "runs" / "victim")):
            r = c.get("/jobs/" + quote(s, safe="%"))
            assert r.status_code in REFUSED and "victim" not in r.text.replace(s, ""), (s, r.status_code)
