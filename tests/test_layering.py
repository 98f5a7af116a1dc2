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


def _imports_with_relative(path: Path, package: str) -> set[str]:
    """Absolute names of every import in `path`, relative ones resolved against `package`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_inference_never_imports_training_code():
    """Only the training packages themselves and the CLI's jobs import scan_model.training/finetune."""
    offenders = []
    for package in ("runtime", "scan_model", "export", "benchmarks"):
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            relative = path.relative_to(PROJECT_ROOT)
            if relative.parts[:2] in (("scan_model", "training"), ("scan_model", "finetune")):
                continue
            dotted = ".".join(relative.with_suffix("").parts)
            owner = dotted if path.name == "__init__.py" else dotted.rpartition(".")[0]
            owner = owner.removesuffix(".__init__")
            if any(n.startswith(f"scan_model.{part}") and n.split(".")[1] == part
                   for n in _imports_with_relative(path, owner) for part in ("training", "finetune")):
                offenders.append(str(relative))
    assert not offenders, f"inference modules importing training code: {offenders}"


def test_the_training_import_scan_resolves_relative_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from .training.trainer import train\nfrom . import training\n")
    names = _imports_with_relative(sample, "scan_model")
    assert "scan_model.training.trainer" in names and "scan_model.training" in names
