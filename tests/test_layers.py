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
            # `from models.value import distributed` imports a module: keep the names too (a name that
            # is not a module is ignored where modules are looked up)
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
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
    assert imported_modules(source) == {"orchestration.cli", "orchestration.cli.main", "assets.common"}


# models/ by concern, lowest first: a module imports its own concern, the ones before it and the shared
# top-level modules (models/__init__.py), never a concern after its own.
CONCERNS = ("lm", "rewards", "data", "value", "decoding", "evaluation", "serving")
SHARED = {p.stem for p in (ROOT / "models").glob("*.py")} - {"__init__"}


def concern_of(module: str) -> str | None:
    """The concern a models.<concern>... module belongs to; None for shared modules and non-models ones
    (`from models import value` names the concern too)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "models" and parts[1] in CONCERNS else None


def concern_violations(root: Path) -> list[str]:
    """Imports under root/models that point at a concern after the importer's own, or from a shared
    module at any concern."""
    wrong = []
    for path in sorted((root / "models").rglob("*.py")):
        rel = path.relative_to(root / "models")
        mine = rel.parts[0] if len(rel.parts) > 1 else None
        for module in sorted(imported_modules(path)):
            other = concern_of(module)
            if other is None or other == mine:
                continue
            if mine is None:
                wrong.append(f"models/{rel} (shared) imports the concern {module}")
            elif CONCERNS.index(other) > CONCERNS.index(mine):
                wrong.append(f"models/{rel} ({mine}) imports {module}, a concern after its own")
    return wrong


def import_circles(root: Path) -> list[str]:
    """Circles among the modules under root/models, through module-level and function-local imports
    alike: a circle is a design knot even when Python tolerates it at run time."""
    graph = {}
    for path in sorted((root / "models").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = imported_modules(path)
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
    return circles


def test_models_is_its_concerns_and_a_few_shared_modules():
    packages = sorted(p.name for p in (ROOT / "models").iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(CONCERNS)
    assert SHARED == {"artifacts", "environment", "profiles", "progress", "stages"}
    for concern in CONCERNS:       # each says what it holds and what it may import
        assert "May import:" in (ROOT / "models" / concern / "__init__.py").read_text()


def test_concerns_import_only_the_ones_before_them():
    wrong = concern_violations(ROOT)
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_between_models_modules():
    circles = import_circles(ROOT)
    assert not circles, "\n".join(circles)


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path):
    def write(rel: str, text: str = "") -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)

    write("models/__init__.py")
    for concern in ("lm", "value", "serving"):
        write(f"models/{concern}/__init__.py")
    write("models/lm/sampling.py", "def f():\n    from models.serving.engine import Engine\n")   # upward
    write("models/serving/engine.py", "from models.lm import kv_cache\n")                          # fine
    write("models/lm/kv_cache.py")
    write("models/value/a.py", "from models.value import b\n")                                    # a -> b
    write("models/value/b.py", "def g():\n    import models.value.a\n")                            # b -> a
    write("models/profiles.py", "from models import value\n")                                     # shared -> concern
    assert concern_violations(tmp_path) == [
        "models/lm/sampling.py (lm) imports models.serving.engine, a concern after its own",
        "models/lm/sampling.py (lm) imports models.serving.engine.Engine, a concern after its own",
        "models/profiles.py (shared) imports the concern models.value"]
    assert import_circles(tmp_path) == ["models.value.a -> models.value.b -> models.value.a"]


def test_what_make_run_executes_needs_no_dev_tool():
    """`VAS_PROFILE=real make run` ends with bench/serve.py, which starts llama.cpp through
    tests/llamacpp.py; `make run` installs the runtime only, so neither may import a dev tool at load."""
    dev_tools = {"pytest", "playwright", "ruff", "mkdocs"}
    for rel in ("bench/serve.py", "tests/llamacpp.py"):
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
        top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        assert not top & dev_tools, f"{rel} imports {sorted(top & dev_tools)} when loaded"
