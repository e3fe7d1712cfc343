"""The one copy of what tests and bench/ scripts share: real server and redis-server processes on free ports
(stopped by their PIDs), polling with a deadline, a small tmpfs, and a random model with non-trivial BN."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import torch
from torch import nn

from models.resnet import ResNet18, build_model

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/14"  # a db of its own; each test also uses a queue name of its own
T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 0.1) -> T:
    """Poll until `check()` is truthy and return it; after `timeout` s fail naming `what` (a callable: read then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}")


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether GET `url` answers 200 right now (False while nothing listens)."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


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
        wait_for(
            lambda: text in self.log(), timeout, lambda: f"{text!r} in the server log:\n{self.log()[-3000:]}", 0.02
        )

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
    `torch_threads=1` by default, since the suite shares two cores; None leaves torch's own choice. /predict runs
    on eager torch unless `env` names an engine (an export per fresh store would cost every server seconds).
    """
    port = free_port()
    full_env = {
        **os.environ,
        "CONVLENS_HOME": str(home),
        "CONVLENS_PORT": str(port),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **({"CONVLENS_DATA_DIR": str(data_dir)} if data_dir else {}),
        **({"CONVLENS_TORCH_THREADS": str(torch_threads)} if torch_threads else {}),
        "CONVLENS_PREDICT_ENGINE": "torch",
        **(env or {}),
    }
    log_path = (log_dir or home) / f"server-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if app == SERVE:
        cmd = [sys.executable, "-m", "convlens", "serve", "--host", "127.0.0.1", "--port", str(port)]
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
        if answers(server.url + ready_path, timeout=1.0):
            return server
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


def redis_up(url: str = REDIS_URL) -> bool:
    """Whether a Redis at `url` answers PING within a second."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@dataclass
class RedisServer:
    """A private redis-server on a free port (no persistence), so a test can restart it; `password`: requirepass."""

    port: int
    proc: subprocess.Popen[bytes] | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        cmd += ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: redis_up(self.url), 10, f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: "70m") on `path`, unmounted afterwards; skips the test where it can't."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def random_model(arch: str = "resnet18", dtype: torch.dtype = torch.float32, seed: int = 0) -> ResNet18:
    """A seeded eval model whose BN is far from identity (random running stats and affine)."""
    torch.manual_seed(seed)
    model = build_model(arch).to(dtype).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model
