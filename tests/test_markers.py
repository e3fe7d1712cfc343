"""`make test-fast` runs exactly the tests not marked `slow`; browser, docker and multi-process tests carry it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# Tests that start a browser, docker, or several real processes: never in the inner loop.
SLOW_PLACES = (
    "tests/browser/",
    "tests/docker/test_compose.py::test_docker_compose",
    "tests/worker/test_faults.py",
    "tests/service/test_processes.py",
    "tests/service/test_jobs_api.py",
)


def _collect(*args: str) -> tuple[list[str], str]:
    """(test ids, the summary line) of `pytest --collect-only` over the suite."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args, "tests"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    return [ln for ln in out.splitlines() if "::" in ln], out.strip().splitlines()[-1]


def test_make_test_fast_deselects_the_slow_marker_only() -> None:
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^test-fast:.*?(?=^\S|\Z)", makefile, re.M | re.S)
    assert rule and '-m "not slow"' in rule.group(0), "test-fast must select the tests not marked slow"
    assert "-m" not in re.search(r"^pytest:.*?(?=^\S|\Z)", makefile, re.M | re.S).group(0)  # type: ignore[union-attr]


@pytest.mark.slow
def test_the_fast_set_is_the_whole_suite_minus_the_marked_tests() -> None:
    # One collection (each costs seconds): the summary says how many of the whole suite the marker left out.
    fast, summary = _collect("-m", "not slow")
    counts = re.search(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", summary)
    assert counts and fast, summary
    assert int(counts[1]) == len(fast) and int(counts[3]) > 0 and int(counts[1]) + int(counts[3]) == int(counts[2])
    assert not [t for t in fast if t.startswith(SLOW_PLACES)], "a browser/docker/multi-process test is not marked"
