"""The job contract's Celery app: configuration, the embedded broker's atomic publishing, what the API imports."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobqueue.app import make_celery, send_train, sender_app
from jobqueue.contract import TRAIN_TASK
from tests.worker.conftest import ROOT, free_port
from worker.reconcile import waiting_run_ids
from worker.settings import WorkerSettings


def test_embedded_broker_is_files_under_home(tmp_path: Path) -> None:
    app = make_celery(WorkerSettings(home=tmp_path, broker_url=None, result_backend=None))
    c = app.conf
    assert c.broker_url.startswith("filesystem://") and c.broker_transport.endswith(":AtomicFilesystemTransport")
    opts = c.broker_transport_options
    assert opts["data_folder_in"] == opts["data_folder_out"] == str(tmp_path.resolve() / "queue" / "messages")
    assert Path(opts["processed_folder"]).is_dir() and opts["store_processed"] is True
    assert c.result_backend == f"file://{tmp_path.resolve()}/queue/results"
    assert c.worker_enable_remote_control is False


def test_long_job_settings(tmp_path: Path) -> None:
    c = make_celery(WorkerSettings(home=tmp_path, broker_url="redis://127.0.0.1:6379/3", queue="gpu")).conf
    assert c.task_acks_late and c.task_reject_on_worker_lost and c.worker_prefetch_multiplier == 1
    assert c.worker_pool == "solo" and c.worker_concurrency == 1
    assert c.task_serializer == c.result_serializer == "json"
    assert c.accept_content == c.result_accept_content == ["json"]
    assert c.task_default_queue == "gpu" and c.task_routes == {TRAIN_TASK: {"queue": "gpu"}}
    # visibility_timeout wherever Celery reads it, longer than any job (a week by default).
    vt = 7 * 24 * 3600
    assert c.broker_transport_options["visibility_timeout"] == vt
    assert c.result_backend_transport_options["visibility_timeout"] == vt
    assert c.result_backend == "redis://127.0.0.1:6379/3"


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVLENS_HOME", str(tmp_path))
    monkeypatch.setenv("CONVLENS_RESULT_BACKEND", "redis://127.0.0.1:6379/5")
    monkeypatch.setenv("CONVLENS_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("CONVLENS_STALE_HEARTBEAT_S", "12")
    s = WorkerSettings()
    assert (s.home, s.max_attempts, s.stale_heartbeat_s, s.data_root) == (tmp_path, 5, 12.0, tmp_path / "data")
    assert s.lease_refresh_s == 2.0
    assert make_celery(s).conf.result_backend == "redis://127.0.0.1:6379/5"
    monkeypatch.setenv("CONVLENS_QUEUE", "../etc")
    with pytest.raises(ValueError, match="queue"):
        WorkerSettings()


def test_sender_has_no_result_backend(tmp_path: Path) -> None:
    # The Redis result backend subscribes to every task the API sends; the API never reads results.
    app = sender_app(WorkerSettings(broker_url="redis://127.0.0.1:6379/14", home=tmp_path))
    assert app.conf.result_backend is None and type(app.backend).__name__ == "DisabledBackend"


def test_embedded_publish_is_whole_and_listable(tmp_path: Path) -> None:
    app = sender_app(WorkerSettings(broker_url=None, home=tmp_path))
    send_train(app, "run-a")
    send_train(app, "run-b")
    folder = tmp_path / "queue" / "messages"
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2 and all(f.endswith(".train.msg") for f in files), files  # no .tmp left behind
    assert waiting_run_ids(app, "train") == {"run-a", "run-b"}
    assert waiting_run_ids(app, "other") == set()


@pytest.mark.slow
def test_importing_the_app_has_no_side_effects_and_no_training_code(tmp_path: Path) -> None:
    code = (
        "import sys, jobqueue.app, worker.celery_app\n"
        "assert 'torch' not in sys.modules\n"  # sending a job needs neither torch nor the trainer
        "heavy = [m for m in ('worker.jobs', 'worker.tasks', 'worker.reconcile') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {"CONVLENS_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    assert not (tmp_path / "home").exists()


@pytest.mark.slow
def test_the_api_sends_jobs_without_the_worker_package(tmp_path: Path) -> None:
    code = (
        "import sys, service.app\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'worker']\n"
        "assert not loaded, loaded\n"
    )
    env = {"CONVLENS_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def test_sending_to_a_dead_broker_fails_fast(tmp_path: Path) -> None:
    # POST /train must answer (the run saved, `dispatched: false`) rather than hang on a down Redis.
    app = sender_app(WorkerSettings(broker_url=f"redis://127.0.0.1:{free_port()}/0", home=tmp_path))
    t0 = time.monotonic()
    with pytest.raises(Exception, match="(?i)connect"):
        send_train(app, "run-x")
    assert time.monotonic() - t0 < 10
