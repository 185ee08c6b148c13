"""The house plan's layering rules, checked on the source: imports go downward only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at_top_level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, id(node) in top))
    return out


@pytest.mark.parametrize("package,forbidden", [("wsi", ("models", "pipelines")), ("models", ("pipelines",))])
def test_lower_layers_never_import_higher_ones(package, forbidden):
    bad = [
        f"{p.relative_to(ROOT)}: {mod}"
        for p in sorted((ROOT / package).rglob("*.py"))
        for mod, _ in _imports(p)
        if mod.split(".")[0] in forbidden
    ]
    assert not bad, bad


def test_nothing_imports_the_cli():
    bad = [
        f"{p.relative_to(ROOT)}: {mod}"
        for pkg in ("wsi", "models", "pipelines")
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if p.name != "cli.py"
        for mod, _ in _imports(p)
        if mod == "pipelines.cli"
    ]
    assert not bad, bad


def test_wsi_imports_no_torch_at_module_level():
    top_level_torch = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "wsi").rglob("*.py"))
        for mod, top in _imports(p)
        if top and mod.split(".")[0] in ("torch", "timm", "torchvision")
    ]
    assert not top_level_torch, top_level_torch
    mods = ", ".join(f"wsi.{p.stem}" for p in sorted((ROOT / "wsi").glob("*.py")) if p.stem != "__init__")
    code = f"import sys, {mods}; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
