"""Nothing lost when a worker dies: job leases, one delivery rule, and a reconciler that re-sends what the broker
forgot, for every kind of queued job (training runs and atlases: a `JobKind` each).

The run store is the source of truth. A worker holds a lease file in a job's folder while it works on it
(created exclusively, refreshed by a thread). On worker start (and every `reconcile_interval_s`), jobs marked
running whose lease is dead are re-queued to resume (failed after `max_attempts` lost workers), and queued jobs
with no message in the broker are sent again: a SIGKILLed worker's message is gone with the file queue, parked
for days in Redis' unacked set, or wiped by a Redis restart.
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
from typing import TYPE_CHECKING, Any, Literal

from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from kombu.transport import filesystem

from jobqueue.app import send_atlas, send_train
from jobqueue.contract import ATLAS_TASK, TERMINAL, TRAIN_TASK
from jobqueue.contract import LEASE_FILE as LEASE
from models.runs import RunStore
from worker.settings import WorkerSettings, get_worker_settings

if TYPE_CHECKING:
    from models.featurevis.atlas import AtlasStore

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


@dataclass(frozen=True)
class JobKind:
    """One kind of queued job as leases, deliveries and the reconciler see it: its records in the run store, the
    Celery task its messages carry, and how to send one again."""

    name: str  # "run", "atlas": for log lines
    task: str
    records: Callable[[], list[dict[str, Any]]]
    dir: Callable[[str], Path]
    read: Callable[[str], dict[str, Any]]
    update: Callable[..., dict[str, Any]]
    cancel_requested: Callable[[str], bool]
    send: Callable[[Celery, str], None]
    resumes: str  # how a re-queued job resumes, for the log
    requeued_progress: Callable[[dict[str, Any], str], dict[str, Any]]


def run_jobs(store: RunStore) -> JobKind:
    """Training runs: a re-queued run's progress keeps only the epoch it resumes after."""
    return JobKind(
        "run", TRAIN_TASK, store.list_runs, store.run_dir, store.read_run, store.update_run, store.cancel_requested,
        send_train, "from its last checkpoint",
        lambda rec, why: {"phase": "requeued", "reason": why, "epoch": (rec.get("progress") or {}).get("epoch")},
    )  # fmt: skip


def atlas_jobs(store: AtlasStore) -> JobKind:
    """Atlases: a re-queued atlas keeps its chunk counts (its finished chunks stay on disk and are served)."""
    return JobKind(
        "atlas", ATLAS_TASK, store.list_atlases, store.dir, store.read, store.update, store.cancel_requested,
        send_atlas, "to resume after its last finished chunk",
        lambda rec, why: {**(rec.get("progress") or {}), "phase": "requeued", "reason": why},
    )  # fmt: skip


def atlas_store(home: Path) -> AtlasStore:
    from models.featurevis.atlas import AtlasStore  # torch: not at worker start

    return AtlasStore(home)


def job_kinds(settings: WorkerSettings) -> list[JobKind]:
    """Every kind of job a worker of this queue takes, over its run store."""
    return [run_jobs(RunStore(settings.home)), atlas_jobs(atlas_store(settings.home))]


def record_lost(jobs: JobKind, rec: dict[str, Any], reason: str, max_attempts: int) -> dict[str, Any]:
    """Count a lost worker on a job we now hold: back to queued, or cancelled, or failed (bounded attempts)."""
    jid, lost = rec["id"], int(rec.get("lost", 0)) + 1
    if jobs.cancel_requested(jid):
        return jobs.update(jid, status="cancelled", lost=lost, finished=time.time())
    if lost >= max_attempts:
        error = f"worker lost {lost} times (last: {reason}); gave up after CONVLENS_MAX_ATTEMPTS={max_attempts}"
        log.error("%s %s: %s", jobs.name, jid, error)
        return jobs.update(jid, status="failed", lost=lost, error=error, finished=time.time())
    log.warning("%s %s: %s; re-queued %s (lost %d of %d)", jobs.name, jid, reason, jobs.resumes, lost, max_attempts)
    return jobs.update(jid, status="queued", lost=lost, progress=jobs.requeued_progress(rec, reason))


Outcome = Literal["done", "duplicate", "requeued", "lost"]


def deliver(
    jobs: JobKind,
    settings: WorkerSettings,
    job_id: str,
    node: str,
    execute: Callable[[dict[str, Any], Callable[[], bool]], dict[str, Any]],
    send: Callable[[str], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> tuple[dict[str, Any], Outcome]:
    """One delivery of an unfinished job: take its lease (or drop a duplicate a live worker holds), count the
    worker it was left running by as lost, run `execute(owner, should_stop)`, and hand it back to the queue if a
    shutdown stopped it. Returns the job's record and what became of this delivery."""
    if stop():  # a warm shutdown began, yet the consumer handed over one more message: give it back untouched
        if send:
            send(job_id)
        return jobs.read(job_id), "requeued"
    owner = owner_info(node)
    lease = Lease.claim(jobs.dir(job_id), owner, settings)
    if lease is None:
        log.info("%s %s is held by a live worker; dropping this duplicate delivery", jobs.name, job_id)
        return jobs.read(job_id), "duplicate"
    with lease:
        rec = jobs.read(job_id)  # again, now that no one else can write it
        if rec.get("status") in TERMINAL:
            return rec, "duplicate"
        if rec.get("status") == "running":  # its worker died and no reconciler has seen it yet
            gone = (rec.get("worker") or {}).get("node", "?")
            rec = record_lost(jobs, rec, f"worker {gone} is gone", settings.max_attempts)
            if rec["status"] != "queued":
                return rec, "lost"
        rec = execute(owner, lambda: stop() or lease.lost)
    if rec["status"] == "queued" and not lease.lost:
        log.warning("%s %s interrupted by shutdown; re-queued", jobs.name, job_id)
        if send:
            send(job_id)
        return rec, "requeued"
    return rec, "done"


def flags(outcome: Outcome) -> dict[str, bool]:
    """A delivery's outcome as its task summary states it (`duplicate: true`, `requeued: true`)."""
    return {outcome: True} if outcome in ("duplicate", "requeued") else {}


def _message_id(raw: bytes | str, task: str) -> str | None:
    """The task id of a raw kombu message (Celery protocol 2) if it carries `task`."""
    try:
        msg = json.loads(raw)
    except ValueError:
        return None
    headers = msg.get("headers") if isinstance(msg, dict) else None
    if not isinstance(headers, dict) or headers.get("task") != task:
        return None
    tid = headers.get("id") or (msg.get("properties") or {}).get("correlation_id")
    return str(tid) if tid else None


def waiting_ids(app: Celery, queue: str, task: str) -> set[str] | None:
    """Ids of `task` jobs with a message waiting in the queue (not ones being worked on); None if the broker
    cannot say (then nothing is re-sent)."""
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
    return {t for t in (_message_id(r, task) for r in raws) if t}


def waiting_run_ids(app: Celery, queue: str) -> set[str] | None:
    return waiting_ids(app, queue, TRAIN_TASK)


@dataclass
class Report:
    """What one reconcile pass did."""

    requeued: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.resent or self.failed or self.cancelled)


def _recover(jobs: JobKind, settings: WorkerSettings, rec: dict[str, Any], node: str, now: float) -> str | None:
    """A job marked running: if its lease is dead, take it and count the lost worker; its new status, or None."""
    jid = str(rec.get("id", ""))
    state, why = lease_state(jobs.dir(jid), settings.stale_heartbeat_s, now)
    fresh = now - float(rec.get("heartbeat") or rec.get("updated") or 0) < settings.stale_heartbeat_s
    if state == "alive" or (state == "absent" and fresh):
        return None
    lease = Lease.claim(jobs.dir(jid), owner_info(node), settings)
    if lease is None:
        return None  # another worker took it over just now
    try:
        return str(record_lost(jobs, jobs.read(jid), why, settings.max_attempts)["status"])
    finally:
        lease.release()


def reconcile(
    jobs: JobKind,
    settings: WorkerSettings,
    send: Callable[[str], None],
    waiting: Callable[[], set[str] | None],
    node: str = "reconciler",
    now: float | None = None,
) -> Report:
    """One pass over this queue's jobs of one kind: recover orphaned running jobs, re-send queued jobs the broker
    lost.

    `waiting()` lists the broker's queue; it is read after the records, so a job listed as queued was sent
    before the broker was read (or so recently that the grace period covers it).
    """
    now = now or time.time()
    report = Report()
    records = jobs.records()
    in_broker = waiting() if any(r.get("status") == "queued" for r in records) else set()
    for rec in records:
        jid, status = str(rec.get("id", "")), rec.get("status")
        if rec.get("queue") != settings.queue:
            continue  # not sent through this queue (a `convlens train` run, or another queue's)
        if status == "running":
            new = _recover(jobs, settings, rec, node, now)
            if new == "queued":
                send(jid)
                report.requeued.append(jid)
            elif new == "failed":
                report.failed.append(jid)
            elif new is not None:
                report.cancelled.append(jid)
        elif status == "queued" and in_broker is not None and jid not in in_broker:
            if now - float(rec.get("updated") or 0) < settings.requeue_grace_s:
                continue  # the API may be sending it right now
            if lease_state(jobs.dir(jid), settings.stale_heartbeat_s, now)[0] == "alive":
                continue  # a worker has taken its message and holds it: it is about to mark the job running
            if jobs.cancel_requested(jid):
                jobs.update(jid, status="cancelled", finished=now)
                report.cancelled.append(jid)
                continue
            log.warning("%s %s is queued but has no message in %r; sending it again", jobs.name, jid, settings.queue)
            send(jid)
            report.resent.append(jid)
    return report


def prune_processed(settings: WorkerSettings, older_than_s: float = 24 * 3600) -> None:
    """Delivered file-queue messages are kept a day (for inspection), then removed."""
    folder = settings.queue_dir / "processed"
    cutoff = time.time() - older_than_s
    for p in folder.glob("*.msg") if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            if p.stat().st_mtime < cutoff:
                p.unlink()


def reconcile_now(app: Celery, settings: WorkerSettings, node: str) -> dict[str, Report]:
    """A reconcile pass over every kind of job against this app's broker, logging what it did."""
    reports = {}
    for jobs in job_kinds(settings):
        send = lambda jid, jobs=jobs: jobs.send(app, jid)  # noqa: E731
        waiting = lambda task=jobs.task: waiting_ids(app, settings.queue, task)  # noqa: E731
        reports[jobs.name] = report = reconcile(jobs, settings, send, waiting, node)
        if report:
            log.warning("reconcile (%s jobs): %s", jobs.name, report)
    if not settings.broker_url:
        prune_processed(settings)
    return reports


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
