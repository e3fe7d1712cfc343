"""Service fixtures: an in-process TestClient, a real server process, and CIFAR-like PNG uploads."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models.data import load_cifar
from service.app import create_app
from service.settings import Settings
from tests.helpers import SERVE, Server, descendants, link_copy, png_bytes, start_server


@pytest.fixture(scope="session")
def test_pngs(synthetic_data: Path) -> list[bytes]:
    """64 distinct synthetic CIFAR-10 test images, PNG-encoded."""
    ds = load_cifar(synthetic_data, "cifar10", train=False)
    return [png_bytes(ds.images[i].permute(1, 2, 0).numpy()) for i in range(64)]


@pytest.fixture
def home(trained_home: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run store, for tests that change it (registry.json, new runs)."""
    return link_copy(trained_home, tmp_path / "home")


def make_client(home: Path, data_dir: Path | None = None, **settings: Any) -> TestClient:
    """A TestClient over create_app with these settings (enter it to run the lifespan). /predict runs on eager
    torch unless a test asks for an engine (tests/service/test_engine.py does): an export per fresh store would
    cost every test seconds."""
    settings = {"predict_engine": "torch", **settings}
    return TestClient(create_app(Settings(home=home, data_dir=data_dir, torch_threads=1, **settings)))


@pytest.fixture(scope="module")
def client(trained_home: Path, synthetic_data: Path) -> Iterator[TestClient]:
    """An in-process app (lifespan run) over the shared trained store; read-only tests only."""
    with make_client(trained_home, synthetic_data) as c:
        yield c


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start real uvicorn servers (`start_server` arguments); each is stopped by its PID at teardown."""
    servers: list[Server] = []

    def start(home: Path, data_dir: Path | None = None, **kw: Any) -> Server:
        s = start_server(home, data_dir, log_dir=tmp_path, **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def server(trained_home: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server process over the shared trained store, for the module's read-only tests."""
    s = start_server(trained_home, synthetic_data, log_dir=tmp_path_factory.mktemp("server-logs"))
    yield s
    s.stop()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start `python -m convlens serve` (what `convlens serve` runs) on a free port, without a local worker;
    at teardown it and every process it started are killed by PID."""
    started: list[Server] = []

    def start(home: Path, data: Path, **env: str) -> Server:
        s = start_server(
            home, data, {"CONVLENS_EMBEDDED_WORKER": "false", **env}, log_dir=tmp_path, app=SERVE, timeout=90
        )
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            family = [s.proc.pid, *descendants(s.proc.pid)]  # API processes and their helpers, by PID
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            s.proc.wait(10)


@pytest.fixture
def fresh(trained_home: Path, synthetic_data: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(run store, dataset root) for a server of one's own: a link copy of the trained home, and the dataset."""
    yield link_copy(trained_home, tmp_path / "home"), synthetic_data
