"""`convlens sweep`: a grid of training jobs (or a preset such as the seed's Table 2) on a running API, followed
with one progress bar per row.

The bars follow `GET /sweeps/{id}` (one request a poll for every row) rather than one event stream per row: a
64-row sweep would otherwise hold 64 streams, past the API's per-client limit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from convlens.watch import _detail, api_url, backoff
from models.sweep import SWEEP_PRESETS

FINISHED = ("succeeded", "failed", "cancelled", "missing")


def add_sweep_command(sub: Any) -> None:
    """The `sweep` subcommand (its options and handler) on convlens' subparsers."""
    p = sub.add_parser("sweep", help="queue a grid of training jobs on a running API (POST /sweeps)")
    p.add_argument("--url", help="the API (default: $CONVLENS_URL or http://127.0.0.1:8000)")
    p.add_argument("--preset", choices=sorted(SWEEP_PRESETS), help="a named sweep (seed-table2: the seed's Table 2)")
    p.add_argument("--grid", type=json.loads, help='JSON: {"field": [values], ...}; every combination is a row')
    p.add_argument("--rows", type=json.loads, help='JSON: [{"field": value, ...}, ...]; explicit rows (x the grid)')
    p.add_argument("--base", type=json.loads, default={}, help="JSON: the fields every row shares")
    p.add_argument("--id", help="name the sweep (default: sweep-<timestamp>)")
    p.add_argument("--watch", action="store_true", help="then follow it with one progress bar per row")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls with --watch")
    p.set_defaults(func=cmd_sweep)


def _body(ns: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"base": ns.base}
    for key in ("preset", "grid", "rows", "id"):
        if getattr(ns, key) is not None:
            body[key] = getattr(ns, key)
    return body


def _print_errors(detail: Any) -> None:
    """A 422's detail, one problem a line (`row 3 batch_size: ...`)."""
    if not isinstance(detail, list):
        print(f"422: {detail}", file=sys.stderr)
        return
    for e in detail:
        where = ".".join(str(p) for p in e.get("loc", [])[1:]) or "sweep"
        print(f"invalid sweep: {where}: {e.get('msg')}", file=sys.stderr)


def cmd_sweep(ns: argparse.Namespace) -> int:
    """POST /sweeps; prints the sweep id and its run ids, then follows it with --watch."""
    import httpx

    url = api_url(ns)
    try:
        r = httpx.post(f"{url}/sweeps", json=_body(ns), timeout=60)
    except httpx.HTTPError as e:
        print(f"cannot reach {url}: {e}", file=sys.stderr)
        return 1
    if r.status_code == 422:
        _print_errors(r.json().get("detail"))
        return 2
    if r.status_code != 202:
        print(f"{r.status_code}: {_detail(r)}", file=sys.stderr)
        return 1
    created = r.json()
    print(json.dumps(created, indent=2))
    return watch_sweep(url, created["id"], ns.interval) if ns.watch else 0


def _label(row: dict[str, Any]) -> str:
    values = " ".join(f"{k}={json.dumps(v)}" for k, v in (row.get("values") or {}).items())
    return f"{row['index']:02d} {values}"[:48]


def _update_bar(bar: Any, row: dict[str, Any]) -> None:
    bar.total = row.get("total_steps") or bar.total
    # A finished run's last heartbeat is its test phase, which carries no step: a done row is a full bar.
    bar.n = bar.total if row["status"] == "succeeded" else row.get("step") or bar.n
    post: dict[str, Any] = {"status": row["status"]}
    if row.get("epoch") is not None:
        post["epoch"] = row["epoch"]
    if row.get("best_val_acc") is not None:
        post["best_val"] = f"{row['best_val_acc']:.4f} (ep {row.get('best_epoch')})"
    if row.get("test_acc") is not None:
        post["test"] = f"{row['test_acc']:.4f}"
    bar.set_postfix(post, refresh=True)


def watch_sweep(url: str, sweep_id: str, interval: float = 2.0, retries: int = 10) -> int:
    """One tqdm bar per row, fed by polling GET /sweeps/{id}, until every row has finished; 0 if all succeeded."""
    import httpx
    from tqdm import tqdm

    bars: dict[str, Any] = {}
    failures = 0
    try:
        while True:
            try:
                r = httpx.get(f"{url}/sweeps/{sweep_id}", timeout=30)
            except httpx.TransportError as e:
                failures += 1
                if failures > retries:
                    print(f"lost the API: {e}", file=sys.stderr)
                    return 1
                time.sleep(backoff(failures))
                continue
            if r.status_code != 200:
                print(f"{r.status_code}: {_detail(r)}", file=sys.stderr)
                return 2
            failures, table = 0, r.json()
            for i, row in enumerate(table["rows"]):
                if row["id"] not in bars:
                    bars[row["id"]] = tqdm(total=1, unit="step", position=i, desc=_label(row), dynamic_ncols=True)
                _update_bar(bars[row["id"]], row)
            if all(row["status"] in FINISHED for row in table["rows"]):
                break
            time.sleep(interval)
    finally:
        for bar in bars.values():
            bar.close()
    print(json.dumps({"id": sweep_id, "counts": table["counts"]}, indent=2))
    return 0 if set(table["counts"]) == {"succeeded"} else 1
