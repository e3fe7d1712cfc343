"""GET /jobs/{id}/events?once=true|timeout=S: a client that cannot wait for a queued job's end gets what is there."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.helpers import add_run
from tests.service.conftest import make_client


def _read(client: TestClient, url: str, **params: Any) -> tuple[list[str], float]:
    t0 = time.monotonic()
    with client.stream("GET", url, params=params) as r:
        assert r.status_code == 200, r.read()
        lines = list(r.iter_lines())
    return lines, time.monotonic() - t0


def test_once_and_timeout_close_a_queued_jobs_stream(home: Path) -> None:
    add_run(home, "waiting", status="queued")
    with make_client(home) as client:
        lines, _ = _read(client, "/jobs/waiting/events", once="true")
        assert "event: status" in lines and '"queued"' in "".join(lines), lines
        assert "event: end" not in lines  # the job has not ended: the stream says why it closed instead
        assert any(line.startswith(": the stream's once/timeout") for line in lines), lines

        lines, took = _read(client, "/jobs/waiting/events", timeout=1.2, heartbeat=0.5)
        assert 1.0 <= took < 10, took
        assert sum(line.startswith(": ping") for line in lines) >= 1 and lines[-2].startswith(": the stream's"), lines

        # A finished job's stream ends with its `end` event as always, once or not.
        lines, _ = _read(client, "/jobs/tiny/events", once="true")
        assert "event: end" in lines

        bad = client.get("/jobs/waiting/events", params={"timeout": 0})
        assert bad.status_code == 422 and "timeout" in bad.text
