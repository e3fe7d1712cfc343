"""The worker's logs: the API's JSON lines (CONVLENS_LOG_FORMAT, default json) from start to warm shutdown, the job id
on the job's records, and no secret (an API key, the broker's password) in any line. Real worker processes."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.worker.conftest import RedisServer, Stack, free_port, wait_for

KEY = "api-key-never-logged-7f3a"
PASSWORD = "broker-pass-never-logged-91c2"
LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def json_records(text: str) -> list[dict[str, Any]]:
    """Every line of the log as a JSON object with time, level, logger and message; fails on any other line."""
    records = []
    assert text.strip(), "the worker logged nothing"
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            pytest.fail(f"line {n} is not JSON: {line!r}")
        assert isinstance(rec, dict), line
        assert {"ts", "level", "logger", "msg"} <= rec.keys(), line
        assert rec["level"] in LEVELS and isinstance(rec["msg"], str), line
        datetime.fromisoformat(rec["ts"])
        records.append(rec)
    return records


def run_one_job(stack: Stack, cli: bool) -> tuple[str, str]:
    """Start a worker, run a small job to success, stop the worker with SIGTERM; (run id, the worker's log)."""
    worker = stack.worker(cli=cli)
    run_id = stack.submit(stack.sender())
    wait_for(lambda: stack.store.read_run(run_id)["status"] == "succeeded", 240, f"job {run_id} to succeed")
    assert worker.stop() == 0  # warm shutdown
    return run_id, worker.log()


@pytest.mark.slow
def test_convlens_worker_logs_json_lines_with_the_job_id(embedded_stack: Stack) -> None:
    embedded_stack.extra_env["CONVLENS_API_KEY"] = f"other-key,{KEY}"
    run_id, text = run_one_job(embedded_stack, cli=True)  # `convlens worker`, the embedded queue
    records = json_records(text)

    msgs = [r["msg"] for r in records]
    assert any(m.endswith(" ready.") for m in msgs)  # Celery's own lines go through the same handler
    assert any("warm shutdown (SIGTERM)" in m for m in msgs)  # and the shutdown notice it would print
    job = [r for r in records if r.get("task_id") == run_id]  # written while the job ran
    assert any(r["msg"].startswith(f"job {run_id} taken by ") for r in job), job
    assert f"job {run_id} succeeded" in {r["msg"] for r in job}
    assert all(r["task_name"] == "convlens.train" for r in job)
    assert not [r for r in records if r.get("task_id") not in (None, run_id)]

    # The settings line names the key field, so the key was there to scrub.
    assert any("'api_key': ***" in m for m in msgs), msgs
    assert KEY not in text and "other-key" not in text


@pytest.mark.slow
def test_celery_worker_scrubs_the_broker_password(tmp_path: Path, synthetic_data: Path, queue_name: str) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis = RedisServer(free_port(), password=PASSWORD).start()  # a password the broker really needs
    stack = Stack(tmp_path / "home", synthetic_data, redis.url, queue_name, extra_env={"CONVLENS_API_KEY": KEY})
    try:
        run_id, text = run_one_job(stack, cli=False)  # `celery -A worker.celery_app worker`
    finally:
        stack.close()
        redis.stop()
    records = json_records(text)
    assert any(r.get("task_id") == run_id for r in records)
    assert PASSWORD not in text and KEY not in text
    # The broker URL was logged (the settings line), with its password scrubbed.
    assert f"redis://:***@127.0.0.1:{redis.port}/0" in text
