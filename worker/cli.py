"""The `convlens` command: train locally, and (in later commands) serve, run a worker, submit and watch."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
import typing
from collections.abc import Iterable, Iterator
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


def _export(ns: argparse.Namespace, **names: str) -> None:
    """Options given on the command line become the CONVLENS_* variables the settings objects read."""
    for option, env in names.items():
        value = getattr(ns, option, None)
        if value:
            os.environ[env] = str(value)


def cmd_worker(ns: argparse.Namespace) -> int:
    """A Celery worker with the project's settings: one job at a time (solo pool) on the training queue."""
    _export(ns, home="CONVLENS_HOME", data="CONVLENS_DATA_DIR", device="CONVLENS_DEVICE")
    from worker.celery_app import worker_app
    from worker.settings import get_worker_settings

    get_worker_settings.cache_clear()
    queue = get_worker_settings().queue
    # No gossip/mingle: they only sync revokes between workers, and add a second to every start.
    argv = ["worker", "--pool=solo", "--concurrency=1", "-Q", queue, f"--loglevel={ns.loglevel}"]
    argv += ["--without-gossip", "--without-mingle", *(["-n", ns.hostname] if ns.hostname else [])]
    extra = ns.celery_args[1:] if ns.celery_args[:1] == ["--"] else ns.celery_args
    worker_app().worker_main([*argv, *extra])
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    """A run's best checkpoint -> a shipped model (half precision) with its model card measured on the test set."""
    from models.runs import RunStore
    from models.shipped import SHIPPED_DIR, SHIPPED_ID, export_model

    store = RunStore(_home(ns))
    run = store.read_run(ns.run_id)
    data_root = Path(ns.data or os.environ.get("CONVLENS_DATA_DIR", str(_home(ns) / "data")))
    out = Path(ns.out) if ns.out else SHIPPED_DIR
    meta = export_model(store.checkpoints_dir(ns.run_id) / "best", out, ns.name or SHIPPED_ID, data_root, run)
    card = meta["card"]
    print(json.dumps({k: card[k] for k in ("test_acc", "test_acc_tta_flip", "best_epoch", "wall_time_s")}, indent=2))
    print(f"wrote {out / (ns.name or SHIPPED_ID)}.safetensors (sha256 {meta['sha256']})")
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    """The API (uvicorn) with, when no broker is configured, a local worker on the embedded queue."""
    _export(ns, home="CONVLENS_HOME", data="CONVLENS_DATA_DIR", host="CONVLENS_HOST", port="CONVLENS_PORT")
    from service.server import serve  # sets OMP_WAIT_POLICY before torch loads
    from service.settings import get_settings

    get_settings.cache_clear()
    serve(get_settings())
    return 0


def _api_url(ns: argparse.Namespace) -> str:
    return str(ns.url or os.environ.get("CONVLENS_URL", "http://127.0.0.1:8000")).rstrip("/")


def cmd_submit(ns: argparse.Namespace) -> int:
    """POST /train with a config built like `train`'s; prints the job, then follows it with --watch."""
    import httpx
    from pydantic import ValidationError

    try:
        cfg = config_from_args(ns)
    except ValidationError as e:
        print(f"invalid training config:\n{e}", file=sys.stderr)
        return 2
    params = {"run_id": ns.run_id} if ns.run_id else {}
    try:
        r = httpx.post(f"{_api_url(ns)}/train", json=cfg.model_dump(), params=params, timeout=30)
    except httpx.HTTPError as e:
        print(f"cannot reach {_api_url(ns)}: {e}", file=sys.stderr)
        return 1
    if r.status_code != 202:
        print(f"{r.status_code}: {r.text}", file=sys.stderr)
        return 1
    job = r.json()
    print(json.dumps(job, indent=2))
    return watch_job(_api_url(ns), job["id"]) if ns.watch else 0


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str, str | None]]:
    """(event, data, id) from the lines of a text/event-stream; comments and `retry:` are skipped."""
    data: list[str] = []
    event: str = "message"
    eid: str | None = None
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data), eid
            event, data, eid = "message", [], None
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                eid = value


BUSY = (429, 503)
MAX_RETRY_AFTER_S = 30.0


def retry_after(header: str | None, default: float) -> float:
    """Seconds to wait from a Retry-After header (delta-seconds), clamped to [0.1, 30]; `default` if absent/odd."""
    try:
        value = float(header) if header is not None else default
    except ValueError:  # an HTTP-date, or garbage: not worth parsing for a progress bar
        value = default
    return min(max(value, 0.1), MAX_RETRY_AFTER_S)


def backoff(failures: int) -> float:
    """Seconds to wait before reconnecting after this many failures in a row."""
    return min(2.0 * failures, 10.0)


def _detail(r: Any) -> str:
    """An error answer's `detail`, else its text."""
    try:
        body = r.json()
    except ValueError:
        return str(r.text)
    return str(body.get("detail", r.text)) if isinstance(body, dict) else str(r.text)


def watch_job(url: str, job: str, retries: int = 10) -> int:
    """A progress bar fed by GET /jobs/{job}/events; reconnects with Last-Event-ID (also after a 429 or 503, waiting
    as Retry-After says); exits on the end event."""
    import httpx
    from tqdm import tqdm

    bar = tqdm(unit="step", dynamic_ncols=True, desc=job)
    last_id: str | None = None
    failures = 0
    try:
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with httpx.stream(
                    "GET", f"{url}/jobs/{job}/events", headers=headers, timeout=httpx.Timeout(10, read=120)
                ) as r:
                    if r.status_code != 200:
                        r.read()
                        if r.status_code not in BUSY or failures >= retries:
                            bar.write(f"{r.status_code}: {r.text}")
                            return 2
                        # Busy, not wrong (too many streams open from this address, a full queue, a restart):
                        # wait as the server asks and try again, within the same budget as a lost connection.
                        failures += 1
                        wait = retry_after(r.headers.get("retry-after"), default=backoff(failures))
                        bar.write(f"{r.status_code}: {_detail(r)}; retrying in {wait:g} s")
                        time.sleep(wait)
                        continue
                    for event, data, eid in sse_events(r.iter_lines()):
                        failures, last_id = 0, eid or last_id
                        rec = json.loads(data)
                        if event == "step":
                            bar.n = rec["step"]
                            post = {k: f"{rec[k]:.4g}" for k in ("loss", "acc", "lr") if k in rec}
                            bar.set_postfix({"epoch": rec.get("epoch"), **post}, refresh=True)
                        elif event == "status":
                            bar.total = (rec.get("progress") or {}).get("total_steps") or bar.total
                            bar.set_description(f"{job} {rec['status']}")
                        elif event == "epoch":
                            accs = {k: round(v, 4) for k, v in rec.items() if k.endswith("_acc")}
                            bar.write(f"epoch {rec['epoch']}: {accs}")
                        elif event == "end":
                            bar.close()
                            print(json.dumps({k: rec.get(k) for k in ("id", "status", "metrics", "error")}, indent=2))
                            return 0 if rec.get("status") == "succeeded" else 1
            except httpx.TransportError as e:
                failures += 1
                if failures > retries:
                    bar.write(f"lost the event stream: {e}")
                    return 1
                time.sleep(backoff(failures))
    finally:
        bar.close()


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

    w = sub.add_parser("worker", help="run a Celery worker for training jobs (solo pool, the train queue)")
    w.add_argument("--home", help="run store (default: $CONVLENS_HOME or ./var)")
    w.add_argument("--data", help="dataset root (default: $CONVLENS_DATA_DIR or <home>/data)")
    w.add_argument("--device", help="auto, cpu, cuda, cuda:1 (default: $CONVLENS_DEVICE or auto)")
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
    _add_config_options(s)
    s.set_defaults(func=cmd_submit)

    wa = sub.add_parser("watch", help="follow a job's progress (its event stream) until it ends")
    wa.add_argument("job", help="the job id")
    wa.add_argument("--url", help="the API (default: $CONVLENS_URL or http://127.0.0.1:8000)")
    wa.set_defaults(func=lambda ns: watch_job(_api_url(ns), ns.job))
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
