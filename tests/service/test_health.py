"""Liveness, readiness (model and broker), Prometheus metrics, the OpenAPI document, and `serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT, answers, free_port, redis_up, wait_for
from tests.service.conftest import make_client

REDIS = "redis://127.0.0.1:6379/0"


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_ready_with_model_and_embedded_queue(client: TestClient) -> None:
    r = client.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json()["checks"]["model"] == "tiny loaded" and "writable" in r.json()["checks"]["broker"]


@pytest.mark.skipif(not redis_up(REDIS), reason="no Redis at 127.0.0.1:6379")
def test_ready_with_real_redis(trained_home: Path) -> None:
    with make_client(trained_home, broker_url=REDIS) as c:
        r = c.get("/ready")
        assert r.status_code == 200 and "reachable" in r.json()["checks"]["broker"]


def test_not_ready_names_what_is_down_without_secrets(tmp_path: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    with make_client(tmp_path, broker_url=url) as c:
        t0 = time.monotonic()
        r = c.get("/ready")
        assert time.monotonic() - t0 < 5
    assert r.status_code == 503
    detail = r.json()["detail"]
    assert "model:" in detail and "convlens train" in detail and "broker:" in detail and "unreachable" in detail
    assert "hunter2" not in r.text


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_metrics_exposition(client: TestClient) -> None:
    client.get("/models/tiny")
    client.get("/no/such/path/12345")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    routes = {labels["route"] for labels, _ in m["convlens_http_requests_total"]}
    assert "/models/{model_id}" in routes and "<unmatched>" in routes and "/no/such/path/12345" not in routes
    assert "convlens_http_request_duration_seconds_bucket" in m
    assert any(labels == {"model": "tiny"} for labels, _ in m["convlens_model_load_seconds"])
    assert "convlens_batch_queue_depth" in m and "convlens_batch_size_count" in m


def test_openapi_documents_both_predict_bodies_and_models(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    body = doc["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert {"/models", "/models/{model_id}", "/models/{model_id}/default", "/health", "/ready", "/metrics"} <= set(
        doc["paths"]
    )
    assert client.get("/docs").status_code == 200


@pytest.mark.slow
def test_serve_starts_a_worker_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    port = free_port()
    # An empty store: the server starts anyway and /predict says how to train a model.
    env = {**os.environ, "CONVLENS_HOME": str(tmp_path), "CONVLENS_PORT": str(port), "CONVLENS_TORCH_THREADS": "1"}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "convlens", "serve"], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/health", timeout=1), 60, "serve to answer /health", 0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/predict", files={"files": ("a.png", b"x")})
        assert r.status_code == 503 and "convlens train" in r.json()["detail"]
        workers = _children(proc.pid)
        has_worker = (ROOT / "worker" / "celery_app.py").is_file()
        assert bool(workers) == has_worker
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
        for pid in workers:
            assert not _alive(pid), f"worker {pid} outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
