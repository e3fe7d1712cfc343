"""The API fuzz with an API key configured: every guarded operation must refuse a request without the key or with
a wrong one (schemathesis' auth checks), and nothing is queued; with the key, the same requests are served.
The first pass: test_fuzz.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.fuzzing import KEY, MARKS, failures, fuzzed_server, schemathesis, summary

pytest.importorskip("schemathesis")
pytestmark = MARKS


def test_with_a_key_every_guarded_operation_refuses_a_missing_or_wrong_key(
    fresh: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    home = fresh[0]
    with fuzzed_server(*fresh, CONVLENS_API_KEY=KEY) as server:
        # No key: schemathesis' auth checks send none and a wrong one to every operation that declares security.
        code, out = schemathesis(server, "--include-method", "POST", "--include-method", "DELETE", examples=3)
        queued_without_key = sorted(p.name for p in (home / "runs").iterdir())
        keyed_code, keyed = schemathesis(server, "-H", f"Authorization: Bearer {KEY}", examples=3)
    with capsys.disabled():
        print(f"\nschemathesis with a key configured, none sent: {summary(out)}; the key sent: {summary(keyed)}")
    assert code == 0 and keyed_code == 0, failures(out) + failures(keyed)
    assert queued_without_key == ["tiny"]  # nothing was queued without the key
    assert len(list((home / "runs").iterdir())) > 1  # with it, the fuzzer's training jobs were taken
