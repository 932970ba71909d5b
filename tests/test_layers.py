"""Layers point one way: orchestration -> assets -> models. Read from the sources' imports
(function-local ones too), so a stray import fails here rather than in a later refactor."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the packages its modules must not import (bench/ and tests/ may import anything).
FORBIDDEN = {"models": ("assets", "orchestration"), "assets": ("orchestration",)}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_point_one_way(package):
    sources = sorted((ROOT / package).rglob("*.py"))
    assert sources
    wrong = [f"{path.relative_to(ROOT)} imports {module}"
             for path in sources for module in sorted(imported_modules(path))
             if module.split(".")[0] in FORBIDDEN[package]]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_function_local_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from orchestration.cli import main\n    import assets.common\n")
    assert imported_modules(source) == {"orchestration.cli", "assets.common"}
