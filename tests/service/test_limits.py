"""Bounds under every route, over real HTTP: URL length (414), body bytes (413, declared or chunked), short 422s."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Server

MAX_BODY = 64 * 1024
MAX_URL = 2048


def _server(server_factory: Callable[..., Server], home: Path, synthetic_data: Path) -> Server:
    env = {"CONVLENS_MAX_UPLOAD_BYTES": str(MAX_BODY), "CONVLENS_MAX_URL_BYTES": str(MAX_URL)}
    return server_factory(home, synthetic_data, env=env)  # type: ignore[no-any-return]


def _chunks(total: int, size: int = 8192) -> Iterator[bytes]:
    yield b'{"epochs": 1, "note": "'
    for _ in range(total // size):
        yield b"a" * size
    yield b'"}'


@pytest.mark.slow
def test_urls_bodies_and_echoes_are_bounded(
    server_factory: Callable[..., Server], home: Path, synthetic_data: Path
) -> None:
    srv = _server(server_factory, home, synthetic_data)
    with srv.client() as http:
        ok = http.get("/jobs", params={"limit": "5"})
        assert ok.status_code == 200
        long = http.get("/jobs", params={"x": "a" * MAX_URL})
        assert long.status_code == 414 and "CONVLENS_MAX_URL_BYTES" in long.json()["detail"], long.text
        assert long.headers["x-request-id"]  # still inside the request-id middleware: logged and traceable

        declared = http.post(
            "/train", content=b"{" + b" " * MAX_BODY + b"}", headers={"content-type": "application/json"}
        )
        assert declared.status_code == 413, declared.text
        assert f"the limit is {MAX_BODY:,}" in declared.json()["detail"]

        chunked = http.post("/train", content=_chunks(4 * MAX_BODY), headers={"content-type": "application/json"})
        assert "content-length" not in chunked.request.headers  # sent chunked: only counting can catch it
        assert chunked.status_code == 413 and "CONVLENS_MAX_UPLOAD_BYTES" in chunked.json()["detail"], chunked.text

        # Under the limit, a bad field is a 422 that names it, without sending the 50 KB back.
        echo = http.post("/train", json={"epochs": 1, "note": "b" * 50_000})
        assert echo.status_code == 422 and len(echo.content) < 2000, len(echo.content)
        err = echo.json()["detail"][0]
        assert err["loc"] == ["body", "note"] and "50,000 long" in err["input"]

        fine = http.post("/train", json={"epochs": 1, "train_limit": 100, "val_size": 100, "milestones": []})
        assert fine.status_code == 202, fine.text
        assert http.get("/health").status_code == 200  # and the server is none the worse


@pytest.mark.slow
def test_image_routes_keep_their_own_limits(
    server_factory: Callable[..., Server], home: Path, synthetic_data: Path
) -> None:
    """A JSON base64 upload without Content-Length is cut off at the same byte limit, with a 413, not a 500."""
    srv = _server(server_factory, home, synthetic_data)
    body = json.dumps({"images": ["A" * (2 * MAX_BODY)]}).encode()
    with srv.client() as http:
        r = http.post(
            "/predict",
            content=iter([body[i : i + 4096] for i in range(0, len(body), 4096)]),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413, r.text
        assert "limit" in r.json()["detail"]
