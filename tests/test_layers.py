"""The packages are layered: runtime <- harvest <- train <- eval <- pipeline, bench. A module imports
only its own package and packages below it (any import, also inside functions or TYPE_CHECKING)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"runtime": 0, "harvest": 1, "train": 2, "eval": 3, "interop": 3, "pipeline": 4, "bench": 4}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(LEVEL))
def test_no_package_imports_one_above_it(package):
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        above = {p for p in imported_packages(path) & set(LEVEL) if p != package and LEVEL[p] >= LEVEL[package]}
        if above:
            wrong[str(path.relative_to(ROOT))] = sorted(above)
    assert wrong == {}


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from eval.report import build_report\n    import train.loop\n")
    assert imported_packages(f) == {"eval", "train"}
