"""Shared fixtures: synthetic CIFAR data, a run store, a small trained checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from models.synthetic import write_synthetic_cifar

# The model shipped in the package would be every test server's default: tests use their own checkpoints, and
# the tests of the shipped model turn it back on. Subprocesses (servers, workers) inherit this.
os.environ["CONVLENS_SHIPPED_MODELS"] = "false"

# Two cores: keep torch from oversubscribing them while servers and workers run beside the tests.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset root holding synthetic cifar-10-batches-py and cifar-100-python folders."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic_cifar(root, "cifar10", n_train=1000, n_test=200)
    write_synthetic_cifar(root, "cifar100", n_train=500, n_test=100)
    return root


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> Path:
    """A run store holding one finished run (`tiny`, seed arch, 1 epoch on the synthetic data)."""
    from models.config import TrainConfig
    from models.runs import RunStore
    from worker.jobs import execute_run

    home = tmp_path_factory.mktemp("home")
    store = RunStore(home)
    cfg = TrainConfig(epochs=1, batch_size=50, val_size=100, milestones=[], log_every=5)
    store.create_run(cfg.model_dump(), run_id="tiny")
    run = execute_run(store, "tiny", synthetic_data, device="cpu", tensorboard=False)
    assert run["status"] == "succeeded", run
    return home
