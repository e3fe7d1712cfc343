"""Nothing lost when a worker dies: run leases, and a reconciler that re-queues what the broker forgot.

The run store is the source of truth. A worker holds a lease file in a run's folder while it trains it (created
exclusively, refreshed by a thread). On worker start (and every `reconcile_interval_s`), runs marked running
whose lease is dead are re-queued from their checkpoint (failed after `max_attempts` lost workers), and queued
runs with no message in the broker are sent again: a SIGKILLed worker's message is gone with the file queue,
parked for days in Redis' unacked set, or wiped by a Redis restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from kombu.transport import filesystem

from jobqueue.app import send_train
from jobqueue.contract import LEASE_FILE as LEASE
from jobqueue.contract import TRAIN_TASK
from models.runs import RunStore
from worker.settings import WorkerSettings, get_worker_settings

log = logging.getLogger("convlens.reconcile")

_HELD: set[Path] = set()  # leases this process holds: its own pid in one of those is not a dead predecessor


def owner_info(node: str) -> dict[str, Any]:
    """Who holds a lease: Celery node name, host and pid (enough to tell a dead local worker at once)."""
    return {"node": node, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed process nobody has reaped yet still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def lease_state(run_dir: Path, stale_s: float, now: float | None = None) -> tuple[str, str]:
    """("alive" | "dead" | "absent", why) for a run's lease, as seen from this process."""
    path = run_dir / LEASE
    if path in _HELD:
        return "alive", "held by this process"
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return "absent", "no lease"
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        owner = {}  # removed or replaced between the two calls: judge by age alone
    if age > stale_s:
        return "dead", f"lease not refreshed for {age:.0f} s (worker {owner.get('node', '?')})"
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        pid = owner["pid"]
        if pid == os.getpid() or _pid_gone(pid):
            return "dead", f"worker {owner.get('node', '?')} (pid {pid}) is gone"
    return "alive", f"held by {owner.get('node', '?')}"


class Lease:
    """A run's ownership file, created exclusively; a thread refreshes its mtime while the job runs."""

    def __init__(self, path: Path, refresh_s: float) -> None:
        self.path, self.refresh_s = path, refresh_s
        self.inode = path.stat().st_ino
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="convlens-lease", daemon=True)
        _HELD.add(path)

    @classmethod
    def claim(cls, run_dir: Path, owner: dict[str, Any], settings: WorkerSettings) -> Lease | None:
        """Take the run unless a live worker holds it (a dead holder's lease is broken first)."""
        path = run_dir / LEASE
        for _ in range(2):
            tmp = run_dir / f".{LEASE}.{uuid.uuid4().hex}"
            tmp.write_text(json.dumps(owner))
            try:
                os.link(tmp, path)  # atomic and exclusive, and the file is complete when it appears
                return cls(path, settings.lease_refresh_s)
            except FileExistsError:
                state, _ = lease_state(run_dir, settings.stale_heartbeat_s)
                if state == "alive":
                    return None
                with contextlib.suppress(FileNotFoundError):  # a rename only one breaker can win
                    dead = run_dir / f".{LEASE}.dead-{uuid.uuid4().hex}"
                    os.rename(path, dead)
                    dead.unlink()
            finally:
                tmp.unlink(missing_ok=True)
        return None

    def start(self) -> Lease:
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                if self.path.stat().st_ino != self.inode:
                    raise FileNotFoundError(self.path)
                os.utime(self.path)
            except FileNotFoundError:
                # Another worker took us for dead (we stalled past stale_heartbeat_s): stop, do not race it.
                log.error("lease %s was taken over; stopping this job", self.path)
                self.lost = True
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        _HELD.discard(self.path)
        with contextlib.suppress(FileNotFoundError):
            if not self.lost and self.path.stat().st_ino == self.inode:
                self.path.unlink()

    def __enter__(self) -> Lease:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.release()


def record_lost(store: RunStore, run: dict[str, Any], reason: str, max_attempts: int) -> dict[str, Any]:
    """Count a lost worker on a run we now hold: back to queued, or cancelled/failed (bounded attempts)."""
    rid, lost = run["id"], int(run.get("lost", 0)) + 1
    epoch = (run.get("progress") or {}).get("epoch")
    if store.cancel_requested(rid):
        return store.update_run(rid, status="cancelled", lost=lost, finished=time.time())
    if lost >= max_attempts:
        error = f"worker lost {lost} times (last: {reason}); gave up after CONVLENS_MAX_ATTEMPTS={max_attempts}"
        log.error("run %s: %s", rid, error)
        return store.update_run(rid, status="failed", lost=lost, error=error, finished=time.time())
    log.warning("run %s: %s; re-queued from its last checkpoint (lost %d of %d)", rid, reason, lost, max_attempts)
    progress = {"phase": "requeued", "reason": reason, "epoch": epoch}
    return store.update_run(rid, status="queued", lost=lost, progress=progress)


def _task_id(raw: bytes | str) -> str | None:
    """The task id of a raw kombu message (Celery protocol 2), if it is one of ours."""
    try:
        msg = json.loads(raw)
    except ValueError:
        return None
    headers = msg.get("headers") or {}
    if headers.get("task") != TRAIN_TASK:
        return None
    tid = headers.get("id") or (msg.get("properties") or {}).get("correlation_id")
    return str(tid) if tid else None


def waiting_run_ids(app: Celery, queue: str) -> set[str] | None:
    """Run ids with a message waiting in the queue (not ones being worked on); None if the broker can't say."""
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=2)
            ch: Any = conn.default_channel
            if isinstance(ch, filesystem.Channel):
                folder = Path(ch.data_folder_in)
                raws = [p.read_bytes() for p in folder.glob(f"*.{queue}.msg") if p.is_file()]
            elif hasattr(ch, "_q_for_pri") and hasattr(ch, "client"):  # Redis: one list per priority step
                keys = {ch._q_for_pri(queue, p) for p in ch.priority_steps}
                raws = [m for k in keys for m in ch.client.lrange(k, 0, -1)]
            else:
                return None
    except Exception as e:  # a broker that cannot be read now: re-send nothing rather than guess
        log.warning("cannot list queue %r: %s", queue, e)
        return None
    return {t for t in map(_task_id, raws) if t}


@dataclass
class Report:
    """What one reconcile pass did."""

    requeued: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.resent or self.failed or self.cancelled)


def reconcile(
    store: RunStore,
    settings: WorkerSettings,
    send: Callable[[str], None],
    waiting: Callable[[], set[str] | None],
    node: str = "reconciler",
    now: float | None = None,
) -> Report:
    """One pass over this queue's runs: recover orphaned running runs, re-send queued runs the broker lost.

    `waiting()` lists the broker's queue; it is read after the runs, so a run listed as queued was sent
    before the broker was read (or so recently that the grace period covers it).
    """
    now = now or time.time()
    report = Report()
    runs = store.list_runs()
    in_broker = waiting() if any(r.get("status") == "queued" for r in runs) else set()
    for run in runs:
        rid, status = run.get("id", ""), run.get("status")
        if run.get("queue") != settings.queue:
            continue  # not sent through this queue (a `convlens train` run, or another queue's)
        if status == "running":
            state, why = lease_state(store.run_dir(rid), settings.stale_heartbeat_s, now)
            fresh = now - float(run.get("heartbeat") or run.get("updated") or 0) < settings.stale_heartbeat_s
            if state == "alive" or (state == "absent" and fresh):
                continue
            lease = Lease.claim(store.run_dir(rid), owner_info(node), settings)
            if lease is None:
                continue  # another worker took it over just now
            try:
                run = record_lost(store, store.read_run(rid), why, settings.max_attempts)
            finally:
                lease.release()
            if run["status"] == "queued":
                send(rid)
                report.requeued.append(rid)
            elif run["status"] == "failed":
                report.failed.append(rid)
            else:
                report.cancelled.append(rid)
        elif status == "queued" and in_broker is not None and rid not in in_broker:
            if now - float(run.get("updated") or 0) < settings.requeue_grace_s:
                continue  # the API may be sending it right now
            if store.cancel_requested(rid):
                store.update_run(rid, status="cancelled", finished=now)
                report.cancelled.append(rid)
                continue
            log.warning("run %s is queued but has no message in %r; sending it again", rid, settings.queue)
            send(rid)
            report.resent.append(rid)
    return report


def prune_processed(settings: WorkerSettings, older_than_s: float = 24 * 3600) -> None:
    """Delivered file-queue messages are kept a day (for inspection), then removed."""
    folder = settings.queue_dir / "processed"
    cutoff = time.time() - older_than_s
    for p in folder.glob("*.msg") if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            if p.stat().st_mtime < cutoff:
                p.unlink()


def reconcile_now(app: Celery, settings: WorkerSettings, node: str) -> Report:
    """A reconcile pass against this app's broker, logging what it did."""
    store = RunStore(settings.home)
    send = lambda rid: send_train(app, rid)  # noqa: E731
    report = reconcile(store, settings, send, lambda: waiting_run_ids(app, settings.queue), node)
    if report:
        log.warning("reconcile: %s", report)
    if not settings.broker_url:
        prune_processed(settings)
    return report


class _Periodic:
    """Re-runs the reconciler every interval in a daemon thread (the solo pool's main thread is training)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, app: Celery, settings: WorkerSettings, node: str) -> None:
        def loop() -> None:
            while not self.stop.wait(settings.reconcile_interval_s):
                with _logged("periodic reconcile"):
                    reconcile_now(app, settings, node)

        self.thread = threading.Thread(target=loop, name="convlens-reconcile", daemon=True)
        self.thread.start()


_periodic = _Periodic()


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    try:
        yield
    except Exception:  # the worker must keep serving even if one pass fails
        log.exception("%s failed", what)


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Reconcile before taking work, then keep reconciling while the worker runs."""
    settings = get_worker_settings()
    app: Celery = sender.app
    node = str(getattr(sender, "hostname", "worker"))
    with _logged("startup reconcile"):
        reconcile_now(app, settings, node)
    if settings.reconcile_interval_s > 0:
        _periodic.start(app, settings, node)
    if type(getattr(sender, "pool", None)).__module__.endswith(".solo"):
        # Import torch and the trainer now (no CUDA init), so the first job does not pay for it.
        with _logged("preload"):
            import worker.jobs  # noqa: F401


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    _periodic.stop.set()
