"""Graceful shutdown of the production entry point (`convlens serve`, i.e. service.server.serve) on SIGTERM.

A request in flight finishes with its full answer, new connections are refused at once, the process exits 0, and an
open event stream ends at once instead of holding the shutdown until CONVLENS_SHUTDOWN_TIMEOUT_S.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Server, add_run, start_server

EXIT_BOUND_S = 8.0  # SIGTERM to exit, once nothing is in flight; far below the graceful timeouts set below


def in_flight(url: str) -> float:
    """The server's convlens_http_requests_in_flight gauge (this scrape counts as one)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    line = next(x for x in text.splitlines() if x.startswith("convlens_http_requests_in_flight "))
    return float(line.split()[1])


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish_refuses_new_ones_and_exits_0(
    serve: Callable[..., Server], home: Path, synthetic_data: Path, test_pngs: list[bytes]
) -> None:
    s = serve(home, synthetic_data)
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(test_pngs)]
    path = "/predict?model=tiny&top_k=10"
    reference = httpx.post(s.url + path, files=files, timeout=60)
    assert reference.status_code == 200, reference.text
    assert len(reference.json()["predictions"]) == len(test_pngs) == 64

    # The same request, its body held back halfway: it is in flight (the app has it) until we let the rest go.
    req = httpx.Request("POST", s.url + path, files=files)
    body = req.read()
    half = len(body) // 2
    release = threading.Event()

    def chunks() -> Iterator[bytes]:
        yield body[:half]
        release.wait(30)
        yield body[half:]

    headers = {"content-type": req.headers["content-type"], "content-length": str(len(body))}
    answer: dict[str, httpx.Response | BaseException] = {}

    def send() -> None:
        try:
            answer["r"] = httpx.post(s.url + path, content=chunks(), headers=headers, timeout=60)
        except BaseException as e:  # noqa: BLE001 - reported by the assertions below
            answer["r"] = e

    t = threading.Thread(target=send)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while in_flight(s.url) < 2:  # our request and this scrape
            assert time.monotonic() < deadline, "the held-back request never reached the app"
            time.sleep(0.02)

        sigterm_at = time.monotonic()
        os.kill(s.proc.pid, signal.SIGTERM)
        s.wait_log('"Shutting down"')  # uvicorn closes its listening socket right after this line
        time.sleep(0.1)
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=3)
        assert t.is_alive() and s.proc.poll() is None, "the server did not wait for the request in flight"
    finally:
        release.set()
        t.join(60)
    r = answer["r"]
    assert isinstance(r, httpx.Response), r
    assert r.status_code == 200, r.text
    assert r.json() == reference.json()  # the full answer, identical to the one before SIGTERM
    assert s.proc.wait(EXIT_BOUND_S) == 0
    assert time.monotonic() - sigterm_at < EXIT_BOUND_S + 5, "shutdown took too long"
    assert "Cancel " not in s.log()  # nothing was cut off by the graceful-shutdown timeout


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["serve", "serve, 2 API processes", "bare uvicorn"])
def test_an_open_event_stream_does_not_hold_the_shutdown(
    entry: str, serve: Callable[..., Server], home: Path, synthetic_data: Path, tmp_path: Path
) -> None:
    add_run(home, "waiting", status="queued")  # never finishes: nothing trains it
    # A long graceful timeout (bare uvicorn: none at all): only the stream ending by itself can make the bound below.
    if entry == "bare uvicorn":
        s = start_server(home, synthetic_data, log_dir=tmp_path)
    else:
        processes = "2" if "2" in entry else "1"
        s = serve(home, synthetic_data, CONVLENS_SHUTDOWN_TIMEOUT_S="60", CONVLENS_API_PROCESSES=processes)
    try:
        with (
            httpx.Client(base_url=s.url, timeout=httpx.Timeout(10, read=30)) as client,
            client.stream("GET", "/jobs/waiting/events", params={"heartbeat": 60}) as r,
        ):
            assert r.status_code == 200
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data:") and '"queued"' in line:
                    break  # the stream is live: its first status event arrived
            sigterm_at = time.monotonic()
            os.kill(s.proc.pid, signal.SIGTERM)
            rest = list(lines)  # until the server closes the stream
            closed_after = time.monotonic() - sigterm_at
        assert ": shutting down; reconnect with Last-Event-ID" in rest, rest
        assert not any(x.startswith("event: end") for x in rest)  # the job did not end: the stream did
        assert closed_after < EXIT_BOUND_S, f"the stream stayed open {closed_after:.1f}s after SIGTERM"
        # `serve` exits 0 on SIGTERM; bare uvicorn re-raises the signal once it has shut down.
        assert s.proc.wait(EXIT_BOUND_S) == (-signal.SIGTERM if entry == "bare uvicorn" else 0)
        assert time.monotonic() - sigterm_at < EXIT_BOUND_S + 1
    finally:
        if entry == "bare uvicorn":  # the serve fixture stops its own
            s.stop()
