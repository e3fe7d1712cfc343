"""Server-sent events for one job, polled from its run folder (no file is held open between polls).

Each metrics.jsonl record is an event named by its kind (`step`, `epoch`, `final`) whose id is its step
(`120`, or `120-epoch`, `120-final` for the records that share a step), so `Last-Event-ID` resumes exactly.
`status` events report status/phase changes, `: ping` comments keep proxies from closing an idle stream, and
one `end` event carries the final status before the stream closes. When the server shuts down (`stop` is set),
the stream ends at once with a `: shutting down` comment; EventSource reconnects with `Last-Event-ID`.

`StreamLimiter` bounds the streams one client holds open (CONVLENS_MAX_SSE_PER_CLIENT), and
`CountedStreamingResponse` gives a stream's slot back however the stream ends: its last event, the client
hanging up, or the server cancelling it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from models.runs import TERMINAL, RunNotFound, RunStore

Cursor = tuple[int, int]  # (step, rank of the record kind within that step)
KIND_RANK = {"step": 0, "epoch": 1, "final": 2}
START: Cursor = (-1, -1)
EVENT_ID_RE = re.compile(r"(-?\d{1,15})(?:-(step|epoch|final))?")
MAX_READ = 4 << 20  # bytes per poll: a huge backlog arrives over several polls, never all in memory


def cursor_of(rec: dict[str, Any]) -> Cursor:
    return int(rec.get("step", 0)), KIND_RANK.get(str(rec.get("kind", "step")), 0)


def event_id(rec: dict[str, Any]) -> str:
    step, kind = int(rec.get("step", 0)), str(rec.get("kind", "step"))
    return str(step) if kind == "step" else f"{step}-{kind}"


def parse_event_id(value: str | None) -> Cursor | None:
    """The cursor a `Last-Event-ID` names; None for a missing or foreign id (then the stream starts over)."""
    m = EVENT_ID_RE.fullmatch((value or "").strip())
    if not m:
        return None
    return int(m.group(1)), KIND_RANK[m.group(2) or "step"]


def format_event(event: str, data: Any, id_: str | None = None) -> str:
    head = f"id: {id_}\n" if id_ is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


class MetricsTail:
    """The complete lines appended to metrics.jsonl since the last poll; starts over if the file was replaced."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.inode = path, 0, -1

    def poll(self) -> list[dict[str, Any]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        if st.st_ino != self.inode or st.st_size < self.offset:
            # A resumed run rewrites the file (dropping a killed attempt's tail): read it again from the top;
            # the caller's cursor skips what it already sent.
            self.inode, self.offset = st.st_ino, 0
        if st.st_size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(MAX_READ)
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def _status(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("status", "attempts", "lost", "progress", "error")
    return {"id": run.get("id"), **{k: run.get(k) for k in keys}}


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


SHUTTING_DOWN = ": shutting down; reconnect with Last-Event-ID\n\n"
TIME_IS_UP = ": the stream's once/timeout is reached; reconnect with Last-Event-ID for more\n\n"


async def job_events(
    store: RunStore,
    run_id: str,
    after: Cursor | None,
    ping_s: float,
    poll_s: float,
    disconnected: Callable[[], Awaitable[bool]],
    stop: asyncio.Event | None = None,
    until: float | None = None,
) -> AsyncIterator[str]:
    """The event stream of one job, from `after` (exclusive) to its terminal status, or until `stop` is set, or
    (`until`, a time.monotonic() deadline) until the first pass that ends past it."""
    yield "retry: 2000\n\n"
    tail = MetricsTail(store.run_dir(run_id) / "metrics.jsonl")
    last, shown, sent_at = after or START, None, time.monotonic()

    def poll() -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        # run.json before the metrics: once it says terminal, the metrics file is complete.
        try:
            run = store.read_run(run_id)
        except (OSError, ValueError):
            return None, []  # between a rename and its read: the next poll sees it whole
        return run, tail.poll()

    while not await disconnected():
        if stop is not None and stop.is_set():
            yield SHUTTING_DOWN
            return
        try:
            run, records = await asyncio.to_thread(poll)  # file reads off the event loop
        except RunNotFound:
            yield format_event("end", {"id": run_id, "status": "deleted"})
            return
        if run is None:
            await _pause(poll_s, stop)
            continue
        for rec in records:
            cur = cursor_of(rec)
            if cur > last:
                last = cur
                yield format_event(str(rec.get("kind", "step")), rec, event_id(rec))
                sent_at = time.monotonic()
        key = (run.get("status"), (run.get("progress") or {}).get("phase"), run.get("attempts"))
        if key != shown:
            shown = key
            yield format_event("status", _status(run))
            sent_at = time.monotonic()
        if run.get("status") in TERMINAL:
            keys = ("metrics", "best_epoch", "best_checkpoint")
            yield format_event("end", {**_status(run), **{k: run.get(k) for k in keys}})
            return
        if until is not None and time.monotonic() >= until:
            yield TIME_IS_UP
            return
        if time.monotonic() - sent_at >= ping_s:
            yield ": ping\n\n"
            sent_at = time.monotonic()
        await _pause(poll_s if until is None else max(0.0, min(poll_s, until - time.monotonic())), stop)


class StreamLimiter:
    """How many event streams each client holds open. Used only on the event loop, so it needs no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def acquire(self, client: str) -> bool:
        """Take a slot for `client`; False when it already holds `limit` streams."""
        n = self.open.get(client, 0)
        if n >= self.limit:
            return False
        self.open[client] = n + 1
        return True

    def release(self, client: str) -> None:
        n = self.open.get(client, 0) - 1
        if n > 0:
            self.open[client] = n
        else:
            self.open.pop(client, None)


class CountedStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls `release` once when it ends, however it ends (done, hung up, cancelled)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
