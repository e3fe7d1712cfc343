"""CONVLENS_MAX_SSE_PER_CLIENT: open GET /jobs/{id}/events streams per client IP, on a real server and connections.

Past the limit a client gets 429 with a detail naming the limit and the setting, and Retry-After; a slot comes back
when a stream ends, whether the client hangs up or the job ends; another client's streams do not count.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from convlens.main import main
from models.runs import RunStore
from tests.helpers import Server, add_run, wait_for

LIMIT = 3
TIMEOUT = httpx.Timeout(10, read=30)


@dataclass
class Stream:
    """One GET /jobs/{job}/events kept open until `close()` (a refusal is read whole)."""

    stack: contextlib.ExitStack
    response: httpx.Response

    @classmethod
    def open(cls, client: httpx.Client, job: str) -> Stream:
        stack = contextlib.ExitStack()
        r = stack.enter_context(client.stream("GET", f"/jobs/{job}/events", params={"heartbeat": 60}))
        if r.status_code != 200:
            r.read()
        return cls(stack, r)

    @property
    def status(self) -> int:
        return self.response.status_code

    def close(self) -> None:
        self.stack.close()


def open_until(client: httpx.Client, job: str, n: int, timeout: float = 10.0) -> list[Stream]:
    """Open `n` streams at once, retrying while any is refused (a slot comes back once the server sees the end)."""
    deadline = time.monotonic() + timeout
    while True:
        streams = [Stream.open(client, job) for _ in range(n)]
        codes = [s.status for s in streams]
        if codes == [200] * n:
            return streams
        for s in streams:
            s.close()
        assert set(codes) <= {200, 429} and time.monotonic() < deadline, f"slots never came back: {codes}"
        time.sleep(0.2)


@pytest.mark.slow
def test_streams_per_client_are_bounded_and_released(server_factory: Callable[..., Server], home: Path) -> None:
    add_run(home, "waiting", status="queued")
    add_run(home, "later", status="queued")
    server = server_factory(home, env={"CONVLENS_MAX_SSE_PER_CLIENT": str(LIMIT)})
    opened: list[Stream] = []

    def track(*new: Stream) -> list[Stream]:
        opened.extend(new)
        return list(new)

    client = httpx.Client(base_url=server.url, timeout=TIMEOUT)
    other = httpx.Client(  # another client: another source address on the loopback network
        base_url=server.url, timeout=TIMEOUT, transport=httpx.HTTPTransport(local_address="127.0.0.2")
    )
    try:
        streams = track(*(Stream.open(client, "waiting") for _ in range(LIMIT)))
        assert [s.status for s in streams] == [200] * LIMIT

        [refused] = track(Stream.open(client, "waiting"))
        assert refused.status == 429
        detail = refused.response.json()["detail"]
        assert f"CONVLENS_MAX_SSE_PER_CLIENT={LIMIT}" in detail and "127.0.0.1" in detail, detail
        assert int(refused.response.headers["retry-after"]) > 0
        assert client.get("/jobs/nope/events").status_code == 404  # an unknown job is still a 404, not a 429

        [elsewhere] = track(Stream.open(other, "waiting"))
        assert elsewhere.status == 200  # the other client's slots are its own
        elsewhere.close()

        # The client hangs up one stream: its slot comes back, and only that one.
        streams.pop().close()
        streams += track(*open_until(client, "waiting", 1))
        assert track(Stream.open(client, "waiting"))[0].status == 429

        # The job ends: each stream gets its end event and the server closes it, giving its slot back (the client
        # hangs up nothing: the connections stay open in its pool).
        RunStore(home).update_run("waiting", status="succeeded")
        for s in streams:
            assert any(line.startswith("event: end") for line in s.response.iter_lines())
        track(*open_until(client, "later", LIMIT))
    finally:
        for s in opened:
            s.close()
        client.close()
        other.close()


@pytest.mark.slow
def test_watch_waits_out_a_429_instead_of_exiting(
    server_factory: Callable[..., Server], home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`convlens watch` on a client whose stream slots are all taken: it waits as Retry-After says and follows the
    job once a slot frees, rather than exiting on the first 429."""
    add_run(home, "watched", status="running")
    server = server_factory(home, env={"CONVLENS_MAX_SSE_PER_CLIENT": "1"})
    client = httpx.Client(base_url=server.url, timeout=TIMEOUT)
    held = Stream.open(client, "watched")
    result: list[int] = []
    watcher = threading.Thread(target=lambda: result.append(main(["watch", "watched", "--url", server.url])))
    out: list[str] = []

    def met_429() -> str:
        """The detail of the 429 that watch reports it is waiting out ("" before it met one)."""
        out.append(capsys.readouterr().out)  # each read takes what was written since the last one
        found = re.search(r"^429: (.*); retrying in [0-9.]+ s$", "".join(out), re.MULTILINE)
        return found[1] if found else ""

    try:
        assert held.status == 200
        watcher.start()
        refusal = wait_for(met_429, 10, lambda: f"watch to report a 429 and wait; its output: {''.join(out)!r}")
        assert "CONVLENS_MAX_SSE_PER_CLIENT=1" in refusal, refusal  # the server's own detail, passed on
        time.sleep(0.5)
        assert watcher.is_alive() and not result, "watch gave up on a 429"
        held.close()
        RunStore(home).update_run("watched", status="succeeded")
        watcher.join(30)
        assert result == [0], "watch did not follow the job to its end once a slot was free"
    finally:
        held.close()
        client.close()
        watcher.join(30)
