"""The long fuzzing run, on demand: tests/service/test_fuzz.py with many more examples per operation.

    .venv/bin/python bench/fuzz.py [--examples 100] [--seed N]

The same `schemathesis run` (every check, as schemathesis.toml says) against a fresh server (and the keyed pass),
with more examples per operation. Prints schemathesis' summary of each pass; exits non-zero on any failure.
CONVLENS_FUZZ_EXAMPLES and CONVLENS_FUZZ_SEED are the environment forms of the two options.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=int(os.environ.get("CONVLENS_FUZZ_EXAMPLES", "100")))
    p.add_argument("--seed", type=int, default=int(os.environ.get("CONVLENS_FUZZ_SEED", "0")), help="0: random")
    a = p.parse_args()
    os.environ["CONVLENS_FUZZ_EXAMPLES"] = str(a.examples)
    os.environ["CONVLENS_FUZZ_SEED"] = str(a.seed)
    os.chdir(ROOT)
    args = [
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "--timeout=0",
        "tests/service/test_fuzz.py",
        "tests/service/test_fuzz_auth.py",
    ]
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main())
