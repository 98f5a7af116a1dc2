"""The layering of DESIGN.md, enforced: import contracts (import-linter) and no imports of the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import PROJECT_ROOT

PACKAGES = ("runtime", "scan_model", "export", "benchmarks", "cli_jobs")


def test_import_contracts_hold():
    """runtime/ never imports torch, scan_model or export; scan_model never export/benchmarks/the CLI; ..."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout and "4 kept" in result.stdout, result.stdout[-2000:]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_nothing_imports_the_cli_module():
    offenders = [
        str(path.relative_to(PROJECT_ROOT))
        for package in PACKAGES
        for path in (PROJECT_ROOT / package).rglob("*.py")
        if {"cli"} & {name.split(".")[0] for name in _imported_modules(path)}
    ]
    assert not offenders, f"modules importing the CLI: {offenders}"


def test_the_import_scan_sees_imports_inside_functions(tmp_path):
    """The scan above must see lazy imports too, or it would pass vacuously."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import cli\n    from torch import nn\n")
    assert {"cli", "torch"} <= _imported_modules(sample)
