"""The direction of imports: models/ never imports service/ or worker/, and reads no environment."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_models_imports_nothing_of_ours_but_models() -> None:
    files = sorted((ROOT / "models").rglob("*.py"))
    assert files
    for f in files:
        assert not _imports(f) & {"service", "worker"}, f


def test_models_reads_no_environment() -> None:
    for f in sorted((ROOT / "models").rglob("*.py")):
        assert "os.environ" not in f.read_text() and "getenv" not in f.read_text(), f
