"""Logs for people and for machines: text on a terminal, JSON elsewhere; `convlens serve` names its URL once."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.logs import resolve_format
from tests.helpers import ROOT, free_port


def test_auto_is_text_on_a_terminal_and_json_elsewhere() -> None:
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            assert resolve_format("auto", tty) == "text"
        r, w = os.pipe()
        with os.fdopen(w, "w") as pipe:
            assert resolve_format("auto", pipe) == "json"
        os.close(r)
        assert resolve_format("auto", io.StringIO()) == "json"
        assert resolve_format("json", None) == "json" and resolve_format("text", io.StringIO()) == "text"
    finally:
        os.close(leader)
        os.close(follower)


def _serve(home: Path, port: int, out: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CONVLENS_TORCH_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("CONVLENS_LOG_FORMAT", None)
    cmd = [sys.executable, "-m", "convlens", "serve", "--home", str(home), "--port", str(port)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


def _read_until(fd: int, text: str, timeout: float = 90.0) -> str:
    """What the process wrote to the terminal until `text` appeared (fails after `timeout`)."""
    seen, deadline = b"", time.monotonic() + timeout
    while text.encode() not in seen:
        assert time.monotonic() < deadline, f"no {text!r} after {timeout}s:\n{seen.decode(errors='replace')[-3000:]}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the process closed the terminal
                break
    return seen.decode(errors="replace")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(60)


@pytest.mark.slow
def test_serve_on_a_terminal_speaks_text_and_names_its_url(tmp_path: Path) -> None:
    port = free_port()
    leader, follower = pty.openpty()
    proc = _serve(tmp_path / "home", port, follower)
    os.close(follower)
    try:
        text = _read_until(leader, "ConvLens is up")
        text += _read_until(leader, "queue 'train' on the embedded queue", timeout=60)  # the worker's one line
    finally:
        _stop(proc)
        os.close(leader)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert not [ln for ln in lines if ln.lstrip().startswith("{")], lines  # no JSON for a person
    up = [ln for ln in lines if "ConvLens is up" in ln]
    assert len(up) == 1 and f"http://127.0.0.1:{port}/ " in up[0] and f"http://127.0.0.1:{port}/docs" in up[0]
    assert not [ln for ln in lines if "-------------- " in ln or "[tasks]" in ln], lines  # no Celery banner art


@pytest.mark.slow
def test_serve_into_a_file_writes_json_lines(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    with log.open("wb") as f:
        proc = _serve(tmp_path / "home", port, f.fileno())
    try:
        deadline = time.monotonic() + 90
        while "ConvLens is up" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        _stop(proc)
    records = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]  # every line is JSON
    assert any(r["msg"].startswith("ConvLens is up") for r in records)
