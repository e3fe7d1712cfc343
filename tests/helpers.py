"""Helpers for tests that talk to a real server process: start uvicorn on a free port, stop it by its PID."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def descendants(pid: int) -> list[int]:
    """Every live process below pid: children, theirs, and so on (by parent pid, from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(text.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [c for c, pp in parents.items() if pp == parent]
        out += kids
        todo += kids
    return out


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running server process: its base URL, the process, and its combined stdout/stderr log."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        """Wait until `text` appears in the server's log."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the server log after {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.02)

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (uvicorn's graceful shutdown) by PID, then SIGKILL if it lingers; returns the exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        return int(self.proc.returncode)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


SERVE = "convlens serve"


def start_server(
    home: Path,
    data_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    app: str = "service.app:create_app",
    ready_path: str = "/health",
    timeout: float = 60.0,
    torch_threads: int | None = 1,
) -> Server:
    """Start `uvicorn --factory <app>` against a run store on a free port; returns once `ready_path` answers 200.

    `app=SERVE` runs the production entry point instead (`convlens serve`: several API processes with
    CONVLENS_API_PROCESSES, a local worker unless CONVLENS_EMBEDDED_WORKER=false).
    Settings come from CONVLENS_* variables: `env` adds or overrides them (e.g. CONVLENS_BROKER_URL).
    `torch_threads=1` by default, since the suite shares two cores; None leaves torch's own choice.
    """
    port = free_port()
    full_env = {
        **os.environ,
        "CONVLENS_HOME": str(home),
        "CONVLENS_PORT": str(port),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **({"CONVLENS_DATA_DIR": str(data_dir)} if data_dir else {}),
        **({"CONVLENS_TORCH_THREADS": str(torch_threads)} if torch_threads else {}),
        **(env or {}),
    }
    log_path = (log_dir or home) / f"server-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if app == SERVE:
        cmd = [sys.executable, "-m", "worker.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "uvicorn", "--factory", app, "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--no-access-log", "--log-level", "warning"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, full_env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.url + ready_path, timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not answer {ready_path} within {timeout}s:\n{server.log()[-4000:]}")


def png_bytes(array: np.ndarray) -> bytes:
    """An (H, W, C) or (H, W) uint8/uint16 array as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def link_copy(src: Path, dst: Path) -> Path:
    """A run store copy made of hard links: instant, and safe because the store only ever renames files in."""
    import shutil

    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def add_run(
    home: Path, run_id: str, status: str = "succeeded", like: str = "tiny", created: float | None = None
) -> Path:
    """A new run in a store: a hard-linked copy of run `like` with its own run.json (and checkpoint time)."""
    import json
    import shutil

    from models.checkpoints import atomic_write_json

    src, dst = home / "runs" / like, home / "runs" / run_id
    shutil.copytree(src, dst, copy_function=os.link)
    run = json.loads((dst / "run.json").read_text())
    atomic_write_json(dst / "run.json", {**run, "id": run_id, "status": status})  # a new file, not the link
    best = dst / "checkpoints" / "best.json"
    meta = json.loads(best.read_text())
    atomic_write_json(best, {**meta, "created": created if created is not None else time.time()})
    return dst
