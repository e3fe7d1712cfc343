"""`convlens train` and `convlens export`: training in this process, and shipping a run's best checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from models.config import PRESETS, TrainConfig
from worker.settings import WorkerSettings


def worker_settings(ns: argparse.Namespace) -> WorkerSettings:
    """The worker's settings (environment, .env) with the options given on the command line on top."""
    given = {"home": getattr(ns, "home", None), "data_dir": getattr(ns, "data", None)}
    given |= {"device": getattr(ns, "device", None), "queue": getattr(ns, "queue", None)}
    return WorkerSettings(**{k: v for k, v in given.items() if v is not None})


def add_config_options(p: argparse.ArgumentParser) -> None:
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


def cmd_train(ns: argparse.Namespace) -> int:
    """Train in this process, with a progress bar, into the run store."""
    from pydantic import ValidationError
    from tqdm import tqdm

    from models.runs import RunStore
    from worker.jobs import execute_run

    settings = worker_settings(ns)
    store = RunStore(settings.home)
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
    bar = tqdm(unit="step", dynamic_ncols=True, desc=run_id)

    def show(p: dict[str, Any]) -> None:
        if "total_steps" in p:
            bar.total = p["total_steps"]
        bar.n = p.get("step", bar.n)
        post = {k: p[k] for k in ("epoch", "loss", "acc", "lr", "images_per_s", "val_acc", "test_acc") if k in p}
        bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in post.items()}, refresh=False)
        bar.refresh()

    run = execute_run(store, run_id, settings.data_root, device=settings.device, on_progress=show)
    bar.close()
    print(
        json.dumps(
            {k: run.get(k) for k in ("id", "status", "metrics", "best_epoch", "best_checkpoint", "error")}, indent=2
        )
    )
    return 0 if run["status"] == "succeeded" else 1


def cmd_export(ns: argparse.Namespace) -> int:
    """A run's best checkpoint -> a shipped model (half precision) with its model card measured on the test set."""
    from models.runs import RunStore
    from models.shipped import SHIPPED_DIR, SHIPPED_ID, export_model

    settings = worker_settings(ns)
    store = RunStore(settings.home)
    run = store.read_run(ns.run_id)
    out = Path(ns.out) if ns.out else SHIPPED_DIR
    meta = export_model(store.checkpoints_dir(ns.run_id) / "best", out, ns.name or SHIPPED_ID, settings.data_root, run)
    card = meta["card"]
    print(json.dumps({k: card[k] for k in ("test_acc", "test_acc_tta_flip", "best_epoch", "wall_time_s")}, indent=2))
    print(f"wrote {out / (ns.name or SHIPPED_ID)}.safetensors (sha256 {meta['sha256']})")
    return 0
