"""`convlens submit` and `convlens watch`: a job on a running API, followed by its event stream."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from convlens.train import config_from_args


class ClientSettings(BaseSettings):
    """Where the commands that talk to an API find it (`CONVLENS_URL`)."""

    model_config = SettingsConfigDict(env_prefix="CONVLENS_", env_file=".env", extra="ignore")

    url: str = Field("http://127.0.0.1:8000", description="the API the client commands talk to")


def api_url(ns: argparse.Namespace) -> str:
    return str(ns.url or ClientSettings().url).rstrip("/")


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
        r = httpx.post(f"{api_url(ns)}/train", json=cfg.model_dump(), params=params, timeout=30)
    except httpx.HTTPError as e:
        print(f"cannot reach {api_url(ns)}: {e}", file=sys.stderr)
        return 1
    if r.status_code != 202:
        print(f"{r.status_code}: {r.text}", file=sys.stderr)
        return 1
    job = r.json()
    print(json.dumps(job, indent=2))
    return watch_job(api_url(ns), job["id"]) if ns.watch else 0


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
