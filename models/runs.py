"""The run store: a directory tree shared by the API and the worker (like a TensorBoard logdir)."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args

from models.atomic import atomic_write_bytes, atomic_write_json
from models.errors import ConvLensError, InvalidArgument

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[str, ...] = get_args(RunStatus)
# Finished: no worker takes a run in one of these (a failed one runs again only when asked: `train --resume`).
TERMINAL = ("succeeded", "failed", "cancelled")


class RunNotFound(ConvLensError, LookupError):
    """No run with that id in the store."""


def validate_id(value: str, pattern: re.Pattern[str], what: str, longest: int) -> str:
    """Ids become file or folder names: letters, digits, '-' and '_' only, bounded, never a path."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidArgument(
            f"invalid {what} id {str(value)[:80]!r}: use 1-{longest} letters, digits, '-' or '_' "
            "(starting with a letter or digit)"
        )
    return value


def validate_run_id(run_id: str) -> str:
    """A run id: 1-64 characters (it names the run's folder)."""
    return validate_id(run_id, RUN_ID_RE, "run", 64)


def new_run_id() -> str:
    """Sortable by creation time, unique by a random suffix."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


class RunStore:
    """`home/runs/<id>/{run.json, metrics.jsonl, tb/, checkpoints/}`, `home/registry.json`, `home/data`."""

    def __init__(self, home: str | Path) -> None:
        self.home = Path(home)
        self.runs_dir = self.home / "runs"

    @property
    def registry_path(self) -> Path:
        return self.home / "registry.json"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / validate_run_id(run_id)

    def checkpoints_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "checkpoints"

    def exists(self, run_id: str) -> bool:
        return (self.run_dir(run_id) / "run.json").is_file()

    def create_run(self, config: dict[str, Any], run_id: str | None = None, status: str = "queued") -> str:
        """A new run folder with its run.json; refuses to overwrite an existing run."""
        run_id = validate_run_id(run_id or new_run_id())
        d = self.run_dir(run_id)
        d.mkdir(parents=True, exist_ok=True)
        if (d / "run.json").exists():
            raise InvalidArgument(f"run {run_id} already exists")
        now = time.time()
        atomic_write_json(
            d / "run.json",
            {
                "id": run_id,
                "status": status,
                "config": config,
                "created": now,
                "updated": now,
                "attempts": 0,
                "progress": {},
                "metrics": {},
            },
        )
        return run_id

    def read_run(self, run_id: str) -> dict[str, Any]:
        """run.json as a dict; RunNotFound if there is no such run."""
        path = self.run_dir(run_id) / "run.json"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise RunNotFound(f"no run {run_id!r}") from e
        return data

    def update_run(self, run_id: str, **fields: Any) -> dict[str, Any]:
        """Merge fields into run.json (one writer per run at a time: the worker that owns it)."""
        run = self.read_run(run_id)
        run.update(fields)
        run["updated"] = time.time()
        atomic_write_json(self.run_dir(run_id) / "run.json", run)
        return run

    def list_runs(self) -> list[dict[str, Any]]:
        """Every readable run, newest first."""
        if not self.runs_dir.is_dir():
            return []
        runs = []
        for d in self.runs_dir.iterdir():
            if RUN_ID_RE.fullmatch(d.name) and (d / "run.json").is_file():
                try:
                    runs.append(json.loads((d / "run.json").read_text()))
                except (OSError, json.JSONDecodeError):
                    continue  # being created right now; the next listing will show it
        return sorted(runs, key=lambda r: r.get("created", 0), reverse=True)

    # Cancel is a flag file, not a field of run.json, so the API never races the worker's writes.
    def request_cancel(self, run_id: str) -> None:
        (self.run_dir(run_id) / "cancel").touch()

    def cancel_requested(self, run_id: str) -> bool:
        return (self.run_dir(run_id) / "cancel").exists()

    def metrics(self, run_id: str) -> MetricsLog:
        return MetricsLog(self.run_dir(run_id) / "metrics.jsonl")


class MetricsLog:
    """metrics.jsonl: one JSON object per line; readers skip a torn last line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        if lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(lines)

    def read(self, after_step: int = -1, limit: int | None = None) -> list[dict[str, Any]]:
        """Records with step > after_step, in file order."""
        out: list[dict[str, Any]] = []
        if not self.path.is_file():
            return out
        with self.path.open() as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) > after_step:
                    out.append(rec)
                    if limit is not None and len(out) >= limit:
                        break
        return out

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (work a killed run did after its last checkpoint)."""
        if not self.path.is_file():
            return
        keep = [r for r in self.read() if r.get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep).encode())
