"""The API fuzz's shared parts: `schemathesis run` from the repository root against a server, and its report.

CONVLENS_FUZZ_EXAMPLES sets the examples per operation (default 6: a few thousand requests in a few minutes on
two cores); CONVLENS_FUZZ_SEED fixes the seed (default: a fresh one each run, printed; .ci/run fixes one).
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, Server, start_server

# A real server and a few thousand requests: minutes, more while the other test process shares the cores.
MARKS = [pytest.mark.slow, pytest.mark.timeout(900)]

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


@contextlib.contextmanager
def fuzzed_server(home: Path, data: Path, **env: str) -> Iterator[Server]:
    """A server of the fuzz's own (no local worker), stopped however the run ends."""
    server = start_server(home, data, env={"CONVLENS_EMBEDDED_WORKER": "false", **env})
    try:
        yield server
    finally:
        server.stop()
