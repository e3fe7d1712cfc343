"""API keys: which routes need one in each mode, both header forms, constant-time comparison, 401s, Swagger."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.auth import key_matches
from tests.service.conftest import make_client

KEYS = "alpha-key-1, beta-key-2"
TRAIN = {"epochs": 1, "batch_size": 50, "val_size": 100, "milestones": []}


@pytest.fixture
def keyed(home: Path, synthetic_data: Path) -> TestClient:
    with make_client(home, synthetic_data, api_key=KEYS) as c:
        yield c  # type: ignore[misc]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_401(r, says: str) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    detail = r.json()["detail"]
    assert says in detail and "X-API-Key" in detail and "Authorization: Bearer" in detail


def test_settings_split_keys() -> None:
    from service.settings import Settings

    assert Settings(api_key=" a , b,,").api_key == ["a", "b"]  # type: ignore[arg-type]


def test_key_matches_every_key_and_only_exact() -> None:
    keys = ["alpha-key-1", "beta-key-2"]
    assert key_matches("alpha-key-1", keys) and key_matches("beta-key-2", keys)
    assert not key_matches("alpha-key-", keys) and not key_matches("alpha-key-11", keys)
    assert not key_matches("", keys) and not key_matches("ALPHA-KEY-1", keys)
    assert not key_matches("ключ", keys)  # non-ASCII: compared as bytes, no TypeError


def test_write_routes_need_a_key(keyed: TestClient) -> None:
    c = keyed
    assert_401(c.post("/train", json=TRAIN), "authentication required")
    assert_401(c.delete("/jobs/tiny"), "authentication required")
    assert_401(c.post("/models/tiny/default"), "authentication required")
    assert_401(c.post("/train", json=TRAIN, headers=bearer("wrong")), "invalid API key")
    assert_401(c.post("/train", json=TRAIN, headers={"X-API-Key": "alpha-key-1x"}), "invalid API key")
    assert_401(c.post("/train", json=TRAIN, headers={"Authorization": "Basic alpha-key-1"}), "authentication")
    assert_401(c.post("/train", json=TRAIN, headers={"X-API-Key": "ключ".encode()}), "invalid")
    # A refused request changed nothing: no run was created.
    assert c.get("/jobs").json()["total"] == 1


def test_write_routes_accept_either_header_and_every_key(keyed: TestClient) -> None:
    c = keyed
    r = c.post("/train", json=TRAIN, params={"run_id": "by-bearer"}, headers=bearer("alpha-key-1"))
    assert r.status_code == 202, r.text
    r = c.post("/train", json=TRAIN, params={"run_id": "by-header"}, headers={"X-API-Key": "beta-key-2"})
    assert r.status_code == 202, r.text
    assert c.delete("/jobs/by-bearer", headers={"X-API-Key": "beta-key-2"}).json()["status"] == "cancelled"
    assert c.delete("/jobs/nope", headers=bearer("alpha-key-1")).status_code == 404  # auth first, then the lookup
    r = c.post("/models/tiny/default", headers=bearer("beta-key-2"))
    assert r.status_code == 200 and r.json()["default"] is True
    # A wrong key beside a right one still gets in (either header may carry it).
    r = c.post("/models/tiny/default", headers={**bearer("wrong"), "X-API-Key": "alpha-key-1"})
    assert r.status_code == 200


def test_reads_stay_open_in_writes_mode(keyed: TestClient, test_pngs: list[bytes]) -> None:
    c = keyed
    for path in ("/health", "/ready", "/models", "/models/tiny", "/jobs", "/jobs/tiny", "/metrics"):
        assert c.get(path).status_code == 200, path
    assert c.post("/predict", files={"files": ("a.png", test_pngs[0], "image/png")}).status_code == 200


def test_auth_all_guards_every_route_but_health_ready_and_docs(home: Path, synthetic_data: Path) -> None:
    with make_client(home, synthetic_data, api_key=KEYS, auth="all") as c:
        for path in ("/models", "/models/tiny", "/jobs", "/jobs/tiny", "/metrics", "/filters"):
            assert_401(c.get(path), "authentication required")
            assert c.get(path, headers={"X-API-Key": "alpha-key-1"}).status_code == 200, path
        assert_401(c.post("/predict", json={"images": []}), "authentication required")
        # /ready stays open for load balancers and container health checks; /docs and its assets for people.
        for path in ("/health", "/ready", "/docs", "/docs-assets/swagger-ui.css", "/openapi.json"):
            assert c.get(path).status_code == 200, path


def test_no_key_configured_means_open_and_a_loud_warning(
    home: Path, synthetic_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="convlens.auth")
    with make_client(home, synthetic_data) as c:
        assert c.post("/models/tiny/default").status_code == 200
        # auth=all without keys: still open (there is nothing to check against), and still warned about.
    assert any("NO API KEY CONFIGURED" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with make_client(home, synthetic_data, api_key="k"):
        pass
    assert not any("NO API KEY" in r.getMessage() for r in caplog.records)


def test_swagger_knows_both_schemes(keyed: TestClient) -> None:
    spec = keyed.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": schemes["bearer"]["description"]}
    assert schemes["apiKey"]["in"] == "header" and schemes["apiKey"]["name"] == "X-API-Key"
    for path, method in (("/train", "post"), ("/jobs/{run_id}", "delete"), ("/models/{model_id}/default", "post")):
        op = spec["paths"][path][method]
        assert {"bearer": []} in op["security"] and {"apiKey": []} in op["security"], path
        assert "401" in op["responses"]
    assert "security" not in spec["paths"]["/models"]["get"]  # reads are open in the default mode
