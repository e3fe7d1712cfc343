"""Structured logs: request ids (made, kept or replaced, echoed), JSON lines, and no secrets in any line."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from models.logs import JsonFormatter, RequestIdFilter, TextFormatter, redact
from tests.helpers import ROOT, free_port, link_copy
from tests.service.conftest import make_client

KEY = "s3cret-key-do-not-log"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Everything logged (any logger) while the test runs, as JSON lines."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter([KEY]))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield buf
    root.removeHandler(handler)
    root.setLevel(old)


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def keyed(trained_home: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    home = link_copy(trained_home, tmp_path_factory.mktemp("logs") / "home")  # its requests set a default
    with make_client(home, synthetic_data, api_key=KEY) as c:
        yield c


def test_request_id_made_kept_or_replaced(keyed: TestClient) -> None:
    made = keyed.get("/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert keyed.get("/health").headers["x-request-id"] != made
    assert keyed.get("/health", headers={"X-Request-ID": "abc-123.x:y_z"}).headers["x-request-id"] == "abc-123.x:y_z"
    for bad in ("a" * 129, "has space", "<script>", "a\tb", "ü"):
        rid = keyed.get("/models", headers={"X-Request-ID": bad.encode()}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid), bad
    # Error answers carry it too: a 404, a 422 and a 401.
    for r in (keyed.get("/jobs/nope"), keyed.get("/jobs/..."), keyed.post("/models/tiny/default")):
        assert r.status_code in (401, 404, 422) and "x-request-id" in r.headers


def test_access_line_is_json_with_the_request_id(keyed: TestClient, captured: io.StringIO) -> None:
    r = keyed.get("/jobs/nope", headers={"X-Request-ID": "trace-42"})
    assert r.status_code == 404
    access = [x for x in lines(captured) if x["logger"] == "convlens.access"]
    assert len(access) == 1
    a = access[0]
    assert a["request_id"] == "trace-42" and a["method"] == "GET" and a["path"] == "/jobs/nope"
    assert a["status"] == 404 and isinstance(a["duration_ms"], float) and a["level"] == "INFO"
    assert a["msg"] == "GET /jobs/nope 404"


def test_no_secret_reaches_the_log(keyed: TestClient, captured: io.StringIO) -> None:
    keyed.post("/models/tiny/default", headers={"Authorization": f"Bearer {KEY}"})
    keyed.post("/models/tiny/default", headers={"X-API-Key": "wrong-key-also-secret"})
    logging.getLogger("convlens.test").warning("headers were Authorization: Bearer %s and X-API-Key: %s", KEY, "zz")
    text = captured.getvalue()
    assert text and KEY not in text and "zz" not in text.replace("\\", "")
    assert "wrong-key-also-secret" not in text


def test_redact() -> None:
    assert redact(f"key={KEY}!", [KEY]) == "key=***!"
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer ***"
    assert redact("'authorization': 'Basic dXNlcg=='") == "'authorization': 'Basic ***'"
    assert redact("{'x-api-key': 'abc'}") == "{'x-api-key': '***'}"
    assert redact("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("api_key=['a', 'b'] host=x") == "api_key=*** host=x"
    assert redact("Settings(api_key=['k1'], auth='writes')") == "Settings(api_key=***, auth='writes')"


def test_text_format_has_the_request_id() -> None:
    rec = logging.makeLogRecord({"msg": "hello %s", "args": (KEY,), "levelname": "INFO", "name": "x"})
    rec.request_id = "rid-1"
    out = TextFormatter([KEY]).format(rec)
    assert "[rid-1]" in out and "hello ***" in out and KEY not in out


@pytest.mark.slow
def test_serve_writes_json_lines_without_secrets(trained_home: Path, tmp_path: Path) -> None:
    """The real entry point (service.server.serve): every stderr line is JSON, the key never appears."""
    port = free_port()
    env = {
        **os.environ,
        "CONVLENS_HOME": str(link_copy(trained_home, tmp_path / "home")),  # it sets a default: a private copy
        "CONVLENS_PORT": str(port),
        "CONVLENS_API_KEY": KEY,
        "CONVLENS_EMBEDDED_WORKER": "false",
        "CONVLENS_TORCH_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "service.server"], cwd=ROOT, env=env, stderr=f, stdout=f)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
        r = httpx.post(url + "/models/tiny/default", headers={"X-API-Key": KEY, "X-Request-ID": "serve-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "serve-1"
        assert httpx.delete(url + "/jobs/tiny", headers={"Authorization": "Bearer nope"}).status_code == 401
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(20)
    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines()]  # every line parses
    assert KEY not in text
    access = [x for x in records if x["logger"] == "convlens.access"]
    assert {"request_id": "serve-1", "status": 200} in [{k: a[k] for k in ("request_id", "status")} for a in access]
    assert any(x["logger"].startswith("uvicorn") for x in records)  # uvicorn's own lines go through it too
