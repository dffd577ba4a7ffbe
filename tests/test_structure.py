"""The layout the README's code map describes: small modules, a thin CLI, experiment fixtures
kept out of the product, and no import hidden inside a function."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "bna_export").rglob("*.py"))
CLI = sorted((ROOT / "cli").glob("*.py"))
OPTIONAL = {"matplotlib", "matplotlib.pyplot", "mlxtend.data", "PIL"}
"""Optional or heavy dependencies that a function may import when it needs them."""


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", LIBRARY + CLI, ids=_name)
def test_modules_stay_small(path):
    limit = 450 if path.name == "main.py" else 400
    assert len(path.read_text().splitlines()) <= limit


@pytest.mark.parametrize("path", LIBRARY + CLI, ids=_name)
def test_no_import_inside_a_function_but_optional_ones(path):
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0 and node.module in OPTIONAL, (fn.name, node.module)
            elif isinstance(node, ast.Import):
                assert all(a.name in OPTIONAL for a in node.names), fn.name


@pytest.mark.parametrize("path", [p for p in LIBRARY if "lab" not in p.parts], ids=_name)
def test_the_product_does_not_import_the_experiment_fixtures(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert "lab" not in (node.module or "").split("."), node.module
