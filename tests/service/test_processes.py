"""CONVLENS_API_PROCESSES=2: `convlens serve` runs two API processes on one port, and they answer as one service.

Real processes over real HTTP: each connection lands on whichever process accepts it, so the checks that matter
are the ones a client or Prometheus sees whatever process answers: the same answers, one default model, metrics
summed over both, a killed process replaced, and one SIGTERM stopping them all.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Server, add_run, descendants, wait_for

PREDICT_200 = 'convlens_http_requests_total{method="POST",route="/predict",status="200"}'


def api_processes(pid: int) -> list[int]:
    """The serving children of a `serve` parent (multiprocessing's spawned processes, not its resource tracker)."""
    return [p for p in descendants(pid) if b"spawn_main" in cmdline(p)]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:  # exited meanwhile
        return b""


def fresh(method: str, url: str, **kw: Any) -> httpx.Response:
    """One request on a connection of its own, so that successive requests can land on different processes."""
    with httpx.Client(timeout=60) as c:
        return c.request(method, url, **kw)


def counter(url: str, name: str) -> float:
    line = next((x for x in fresh("GET", url + "/metrics").text.splitlines() if x.startswith(name + " ")), None)
    return float(line.split()[1]) if line else 0.0


@pytest.mark.slow
def test_two_api_processes_serve_as_one(
    serve: Callable[..., Server], home: Path, synthetic_data: Path, test_pngs: list[bytes], tmp_path: Path
) -> None:
    prom = tmp_path / "prometheus"
    prom.mkdir()
    (prom / "counter_999999.db").write_bytes(b"left by an earlier run")  # must not be summed in (or crash a scrape)
    add_run(home, "other")
    s = serve(home, synthetic_data, CONVLENS_API_PROCESSES="2", PROMETHEUS_MULTIPROC_DIR=str(prom))
    wait_for(lambda: len(api_processes(s.proc.pid)) == 2, 60, "serve to start two API processes", 0.2)
    first = api_processes(s.proc.pid)

    # Each image alone, 48 requests on new connections from 8 threads: both processes answer, identically.
    images = test_pngs[:16]

    def predict(i: int) -> tuple[int, httpx.Response]:
        return i % 16, fresh("POST", s.url + "/predict?model=tiny", files={"files": ("x.png", images[i % 16])})

    single = dict(map(predict, range(16)))
    with ThreadPoolExecutor(8) as pool:
        again = list(pool.map(predict, range(48)))
    for i, r in [*single.items(), *again]:
        assert r.status_code == 200, r.text
        got, want = r.json()["predictions"][0]["top_k"], single[i].json()["predictions"][0]["top_k"]
        assert [g["index"] for g in got] == [w["index"] for w in want]
        assert all(abs(g["probability"] - w["probability"]) < 1e-5 for g, w in zip(got, want, strict=True))

    # /metrics sums both processes: every scrape, whichever process answers it, counts all 64 predictions, and
    # both processes recorded some (each keeps its own file).
    for _ in range(6):
        assert counter(s.url, PREDICT_200) == 64
    writers = {int(p.stem.rsplit("_", 1)[1]) for p in prom.glob("counter_*.db")}
    assert set(first) <= writers, (first, writers)

    # A new default set through one process is the default of both.
    assert fresh("POST", s.url + "/models/other/default").status_code == 200
    for _ in range(8):
        r = fresh("POST", s.url + "/predict", files={"files": ("x.png", images[0])})
        assert r.status_code == 200 and r.json()["model"] == "other", r.text

    # A process that dies is replaced, and the service keeps answering meanwhile.
    os.kill(first[0], signal.SIGKILL)
    wait_for(lambda: len(set(api_processes(s.proc.pid)) - set(first)) == 1, 60, "the killed process's successor", 0.2)
    for i in range(6):
        assert predict(i)[1].status_code == 200

    # One SIGTERM stops every process; the parent exits 0 and removes nothing of the operator's folder but data.
    family = api_processes(s.proc.pid)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0, s.log()[-3000:]
    assert not [p for p in family if Path(f"/proc/{p}").exists()], "an API process outlived serve"
