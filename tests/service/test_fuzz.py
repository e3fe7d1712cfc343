"""The whole HTTP API against its own OpenAPI schema: `schemathesis run`, every check, as a user would run it.

A real server (a fresh run store holding one trained model, the synthetic dataset) and schemathesis' command line
with every check: no 5xx, documented statuses, content types and bodies; schema-valid requests accepted and
schema-violating ones refused; a 405's Allow; security only where declared; and the examples, coverage, fuzzing
and stateful phases. The repository's schemathesis.toml is what the command reads (the image hooks, and the one
list of operations whose cross-parameter rules OpenAPI cannot state). A second pass runs with an API key
configured: every guarded operation must refuse a request without the key or with a wrong one (schemathesis'
auth checks), and nothing is queued.

CONVLENS_FUZZ_EXAMPLES sets the examples per operation (default 6: a few thousand requests in a few minutes on
two cores); CONVLENS_FUZZ_SEED fixes the seed (default: a fresh one each run, printed; .ci/run fixes one).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, Server, link_copy, start_server

pytest.importorskip("schemathesis")
pytestmark = pytest.mark.slow  # a real server and a few thousand requests

EXAMPLES = int(os.environ.get("CONVLENS_FUZZ_EXAMPLES", "6"))
SEED = int(os.environ.get("CONVLENS_FUZZ_SEED", "0")) or random.randrange(1, 2**31)
KEY = "fuzz-key"


def schemathesis(server: Server, *extra: str, examples: int = EXAMPLES) -> tuple[int, str]:
    """`schemathesis run` from the repository root (schemathesis.toml turns on every check); (code, output)."""
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe), "run", f"{server.url}/openapi.json", "--max-examples", str(examples)]
    cmd += ["--seed", str(SEED), "--no-color", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    return done.returncode, done.stdout + done.stderr


def failures(output: str) -> str:
    """The failure reports, each line cut short (a reproducing curl can hold kilobytes of generated data)."""
    start, end = output.find("FAILURES"), output.find("WARNINGS")
    part = output[start : end if end > start else None] if start >= 0 else output[-5000:]
    return "\n".join(line[:300] for line in part.splitlines())


def summary(output: str) -> str:
    """The run's last line: '... N passed' or '... failures ...'."""
    lines = [line.strip("= ") for line in output.splitlines() if line.startswith("=")]
    return lines[-1] if lines else output[-500:]


@pytest.fixture
def fresh(trained_home: Path, synthetic_data: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    yield link_copy(trained_home, tmp_path / "home"), synthetic_data


def test_schemathesis_checks_all_pass_on_a_fresh_server(
    fresh: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    home, data = fresh
    server = start_server(home, data, env={"CONVLENS_EMBEDDED_WORKER": "false"})
    try:
        code, out = schemathesis(server)
    finally:
        server.stop()
    with capsys.disabled():  # the figure the README quotes, shown without -s
        print(f"\nschemathesis, every check (seed {SEED}): {summary(out)}")
    assert code == 0, failures(out)
    generated = int(re.search(r"(\d+) generated", out).group(1))  # type: ignore[union-attr]
    assert generated >= 500 and "Selected: " in out, out[-3000:]
    assert "5xx" not in summary(out)


def test_with_a_key_every_guarded_operation_refuses_a_missing_or_wrong_key(
    fresh: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    home, data = fresh
    server = start_server(home, data, env={"CONVLENS_EMBEDDED_WORKER": "false", "CONVLENS_API_KEY": KEY})
    try:
        # No key: schemathesis' auth checks send none and a wrong one to every operation that declares security.
        code, out = schemathesis(server, "--include-method", "POST", "--include-method", "DELETE", examples=3)
        queued_without_key = sorted(p.name for p in (home / "runs").iterdir())
        keyed_code, keyed = schemathesis(server, "-H", f"Authorization: Bearer {KEY}", examples=3)
    finally:
        server.stop()
    with capsys.disabled():
        print(f"\nschemathesis with a key configured, none sent: {summary(out)}; the key sent: {summary(keyed)}")
    assert code == 0 and keyed_code == 0, failures(out) + failures(keyed)
    assert queued_without_key == ["tiny"]  # nothing was queued without the key
    assert len(list((home / "runs").iterdir())) > 1  # with it, the fuzzer's training jobs were taken
