"""The `convlens` command: train locally, and (in later commands) serve, run a worker, submit and watch."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from models.config import PRESETS, TrainConfig


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, typed from the field (bools as --x/--no-x)."""
    for name, f in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = f.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        base = args[0] if isinstance(ann, types.UnionType) and args else ann
        help_ = f.description or ""
        if base is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(base) is list:
            p.add_argument(flag, dest=name, type=int, nargs="*", default=None, help=help_)
        elif typing.get_origin(base) is typing.Literal:
            p.add_argument(flag, dest=name, choices=typing.get_args(base), default=None, help=help_)
        else:
            p.add_argument(flag, dest=name, type=base, default=None, help=help_)  # type: ignore[arg-type]


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """A preset, then every option given on the command line, validated."""
    values: dict[str, Any] = dict(PRESETS[ns.preset])
    values.update({k: getattr(ns, k) for k in TrainConfig.model_fields if getattr(ns, k, None) is not None})
    return TrainConfig.model_validate(values)


def _home(ns: argparse.Namespace) -> Path:
    return Path(ns.home or os.environ.get("CONVLENS_HOME", "var"))


def cmd_train(ns: argparse.Namespace) -> int:
    """Train in this process, with a progress bar, into the run store."""
    from pydantic import ValidationError
    from tqdm import tqdm

    from models.runs import RunStore
    from worker.jobs import execute_run

    store = RunStore(_home(ns))
    if ns.resume:
        run_id = ns.resume
        store.read_run(run_id)
    else:
        try:
            cfg = config_from_args(ns)
        except ValidationError as e:
            print(f"invalid training config:\n{e}", file=sys.stderr)
            return 2
        run_id = store.create_run(cfg.model_dump(), run_id=ns.run_id)
    data_root = Path(ns.data or os.environ.get("CONVLENS_DATA_DIR", str(_home(ns) / "data")))
    bar = tqdm(unit="step", dynamic_ncols=True, desc=run_id)

    def show(p: dict[str, Any]) -> None:
        if "total_steps" in p:
            bar.total = p["total_steps"]
        bar.n = p.get("step", bar.n)
        post = {k: p[k] for k in ("epoch", "loss", "acc", "lr", "images_per_s", "val_acc", "test_acc") if k in p}
        bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in post.items()}, refresh=False)
        bar.refresh()

    run = execute_run(store, run_id, data_root, device=ns.device, on_progress=show)
    bar.close()
    print(
        json.dumps(
            {k: run.get(k) for k in ("id", "status", "metrics", "best_epoch", "best_checkpoint", "error")}, indent=2
        )
    )
    return 0 if run["status"] == "succeeded" else 1


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
    _add_config_options(t)
    t.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
