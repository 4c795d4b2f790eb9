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


def test_fresh_imports_stay_light(cache_dir):
    """In a fresh interpreter: every module of ``trainer`` and ``visalign`` loads no Dask, FAISS, open_clip or
    pipeline code (third-party imports at module level, which the static rule above cannot see); then
    ``pipeline.encoders`` adds no open_clip, timm, FAISS or Dask (they are imported only when their backend or
    scheduler is asked for)."""
    import os
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys\n"
        "import trainer, visalign\n"
        "for pkg in (trainer, visalign):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "def heavy(names):\n"
        "    return sorted(m for m in sys.modules if m.split('.')[0] in names)\n"
        "print(len(sys.modules), heavy(('dask', 'distributed', 'faiss', 'open_clip', 'pipeline')))\n"
        "before = set(sys.modules)\n"
        "import pipeline.encoders, pipeline.encoders.hf\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('open_clip', 'timm', 'faiss', 'dask')))\n"
    )
    env = {**os.environ, "VISALIGN_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = out.stdout.strip().splitlines()[-2:]
    num_modules, trainer_heavy = first.split(" ", 1)
    assert trainer_heavy == "[]" and int(num_modules) > 500  # the modules (and torch) were really imported
    assert second == "[]"


def test_the_rule_sees_lazy_imports(tmp_path):
    """A violation inside a function body is found too (the form lazy imports take here)."""
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from pipeline.encoders import load_encoder\n    import faiss\n")
    assert imported_modules(sample) == [(2, "pipeline"), (3, "faiss")]
