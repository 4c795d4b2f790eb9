"""The package layout's import rules, checked on every import statement (module level and inside functions).

    visalign  (shared core)   imports neither application
    pipeline  (offline half)  may import visalign, never trainer
    trainer   (training half) may import visalign, never pipeline; and never Dask or FAISS
    tests, benchmarks, devtools may import anything

So the trainer runs on a GPU node without the pipeline's dependencies by construction, not only because a
run happened not to reach an import (``test_trainer_run.py`` checks that at run time as well).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "visalign": {"pipeline", "trainer", "dask", "distributed", "faiss", "open_clip"},
    "pipeline": {"trainer"},
    "trainer": {"pipeline", "dask", "distributed", "faiss", "open_clip"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level module)`` of every absolute import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported_modules(path):
            if module in FORBIDDEN[package]:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_rules(package):
    assert violations(package) == [], f"{package} may not import {sorted(FORBIDDEN[package])}"


def test_the_rule_sees_lazy_imports(tmp_path):
    """A violation inside a function body is found too (the form lazy imports take here)."""
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from pipeline.encoders import load_encoder\n    import faiss\n")
    assert imported_modules(sample) == [(2, "pipeline"), (3, "faiss")]
