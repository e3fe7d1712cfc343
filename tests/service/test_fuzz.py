"""The whole HTTP API against its own OpenAPI schema: `schemathesis run`, every check, as a user would run it.

A real server (a fresh run store holding one trained model, the synthetic dataset) and schemathesis' command line
with every check: no 5xx, documented statuses, content types and bodies; schema-valid requests accepted and
schema-violating ones refused; a 405's Allow; security only where declared; and the examples, coverage, fuzzing
and stateful phases. The repository's schemathesis.toml is what the command reads (the image hooks, and the one
list of operations whose cross-parameter rules OpenAPI cannot state). A second pass runs with an API key
configured (test_fuzz_auth.py: a file of its own, so that `make test`'s two test processes can run the two long
passes side by side). The settings and the command: tests/service/fuzzing.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.service.fuzzing import MARKS, SEED, failures, fuzzed_server, schemathesis, summary

pytest.importorskip("schemathesis")
pytestmark = MARKS


def test_schemathesis_checks_all_pass_on_a_fresh_server(
    fresh: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with fuzzed_server(*fresh) as server:
        code, out = schemathesis(server)
    with capsys.disabled():  # the figure the README quotes, shown without -s (in one test process: PYTEST_WORKERS=0)
        print(f"\nschemathesis, every check (seed {SEED}): {summary(out)}")
    assert code == 0, failures(out)
    generated = int(re.search(r"(\d+) generated", out).group(1))  # type: ignore[union-attr]
    assert generated >= 500 and "Selected: " in out, out[-3000:]
    assert "5xx" not in summary(out)
