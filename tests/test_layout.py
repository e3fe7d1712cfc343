"""The house keeps its shape: who imports whom, no environment in models/, no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "service", "worker", "jobqueue", "convlens")
# Which of our packages each may import (models/ none but itself; service/ and worker/ never each other).
ALLOWED = {
    "models": {"models"},
    "jobqueue": {"jobqueue", "models"},
    "service": {"service", "jobqueue", "models"},
    "worker": {"worker", "jobqueue", "models"},
    "convlens": {"convlens", "service", "worker", "jobqueue", "models"},
}
MAX_FUNCTION_LINES = 80


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    return files


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_one_way(package: str) -> None:
    ours = set(PACKAGES)
    for f in _files(package):
        wrong = (_imports(f) & ours) - ALLOWED[package]
        assert not wrong, f"{f.relative_to(ROOT)} imports {sorted(wrong)}"


def test_models_reads_no_environment() -> None:
    for f in _files("models"):
        text = f.read_text()
        assert "os.environ" not in text and "getenv" not in text, f


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`file:line name (N lines)` for every function or method longer than `limit` lines."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > limit:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_over_80_lines() -> None:
    found = [entry for package in PACKAGES for f in _files(package) for entry in long_functions(f)]
    assert not found, "\n".join(found)


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    f = ROOT / "tests" / f"_tmp_long_{tmp_path.name}.py"
    try:
        f.write_text(f"def long():\n{body}\n")
        assert long_functions(f) == [f"tests/{f.name}:1 long (81 lines)"]
    finally:
        f.unlink()
