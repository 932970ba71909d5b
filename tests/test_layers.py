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


# models/ by concern, lowest first: a module imports its own concern, the ones before it and the shared
# top-level modules (models/__init__.py), never a concern after its own.
CONCERNS = ("lm", "rewards", "data", "value", "decoding", "evaluation", "serving")
SHARED = {p.stem for p in (ROOT / "models").glob("*.py")} - {"__init__"}


def concern_of(module: str) -> str | None:
    """The concern a models.<concern>... module belongs to; None for shared modules and non-models ones."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "models" and parts[1] in CONCERNS else None


def test_models_is_its_concerns_and_a_few_shared_modules():
    packages = sorted(p.name for p in (ROOT / "models").iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(CONCERNS)
    assert SHARED == {"artifacts", "environment", "profiles", "progress", "stages"}
    for concern in CONCERNS:       # each says what it holds and what it may import
        assert "May import:" in (ROOT / "models" / concern / "__init__.py").read_text()


def test_concerns_import_only_the_ones_before_them():
    wrong = []
    for path in sorted((ROOT / "models").rglob("*.py")):
        rel = path.relative_to(ROOT / "models")
        mine = rel.parts[0] if len(rel.parts) > 1 else None
        for module in sorted(imported_modules(path)):
            other = concern_of(module)
            if other is None:
                continue
            if mine is None:
                wrong.append(f"models/{rel} (shared) imports the concern {module}")
            elif CONCERNS.index(other) > CONCERNS.index(mine):
                wrong.append(f"models/{rel} ({mine}) imports {module}, a concern after its own")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_between_models_modules():
    """Module-level and function-local imports alike: a circle is a design knot even when Python
    tolerates it at run time."""
    graph = {}
    for path in sorted((ROOT / "models").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = set()
        for name in imported_modules(path):
            # `from models.x import y` may name a module (models.x.y) or an object in models.x
            graph[module].add(name)
    graph = {m: {n for n in deps if n in graph and n != m} for m, deps in graph.items()}
    state, circles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)


def test_the_concern_check_catches_an_import_upward(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from models.serving.serving import Engine\n")
    assert [concern_of(m) for m in imported_modules(source)] == ["serving"]
