"""The stage registry (models/stages.py) is the one declaration of each asset: dvc.yaml and the
Dagster graph must say the same."""

import yaml

from models.profiles import PROJECT_ROOT
from models.stages import STAGES, dvc_stage


def test_dvc_yaml_agrees_with_the_registry():
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    for name, stage in STAGES.items():
        expected = dvc_stage(stage)
        assert stages[name] == expected, (
            f"dvc.yaml stage {name} differs from models/stages.py; it should read:\n"
            + yaml.safe_dump({name: expected}, sort_keys=False))


def test_dagster_deps_are_the_registry_upstream():
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == set(STAGES)
    for name, stage in STAGES.items():
        node = graph.get(next(k for k in graph.get_all_asset_keys() if k.to_user_string() == name))
        assert {k.to_user_string() for k in node.parent_keys} == set(stage.upstream), name


def test_code_version_follows_only_the_stage_own_sources(tmp_path):
    from models.stages import code_hash

    (tmp_path / "models" / "pkg").mkdir(parents=True)
    for name in ("a.py", "b.py", "pkg/c.py"):
        (tmp_path / "models" / name).write_text(f"# {name}\n")
    a, b, folder = ["models/a.py"], ["models/b.py"], ["models/pkg"]
    before = {k: code_hash(v, tmp_path) for k, v in (("a", a), ("b", b), ("folder", folder))}
    assert len(set(before.values())) == 3
    (tmp_path / "models" / "b.py").write_text("# b, edited\n")
    assert code_hash(a, tmp_path) == before["a"] and code_hash(b, tmp_path) != before["b"]
    (tmp_path / "models" / "pkg" / "d.py").write_text("# new module in a package\n")
    assert code_hash(folder, tmp_path) != before["folder"]


def test_every_stage_code_exists_and_assets_carry_its_version():
    from models.stages import code_version
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        name = key.to_user_string()
        assert all((PROJECT_ROOT / path).exists() for path in STAGES[name].code), name
        assert graph.get(key).code_version == code_version(name)


def test_code_files_follow_models_imports_transitively(tmp_path):
    """A stage that lists models/a.py also depends on what a imports (b), what b imports (a module of
    the concern package c, and the package c/unit below it as one unit) and what `from models import d`
    names; an asset file's own imports are not followed."""
    from models.stages import code_files, code_hash

    (tmp_path / "models" / "c" / "unit").mkdir(parents=True)
    (tmp_path / "assets").mkdir()
    (tmp_path / "models" / "a.py").write_text("from models.b import f\n")
    (tmp_path / "models" / "b.py").write_text("def f():\n    import models.c.inner\n    from models import d\n"
                                              "    from models.c.unit.deep import W\n")
    (tmp_path / "models" / "c" / "__init__.py").write_text("")
    (tmp_path / "models" / "c" / "inner.py").write_text("X = 1\n")
    (tmp_path / "models" / "c" / "other.py").write_text("V = 0\n")            # imported by no one
    (tmp_path / "models" / "c" / "unit" / "deep.py").write_text("W = 4\n")
    (tmp_path / "models" / "d.py").write_text("Y = 2\n")
    (tmp_path / "models" / "e.py").write_text("Z = 3\n")
    (tmp_path / "assets" / "stage.py").write_text("from models.e import Z\n")
    listed = ["models/a.py", "assets/stage.py"]
    files = code_files(listed, tmp_path)
    assert files == ["models/a.py", "assets/stage.py", "models/b.py", "models/c/inner.py", "models/c/unit",
                     "models/d.py"]
    before = code_hash(files, tmp_path)
    (tmp_path / "models" / "c" / "other.py").write_text("V = 1\n")     # same concern, not imported
    assert code_hash(code_files(listed, tmp_path), tmp_path) == before
    (tmp_path / "models" / "c" / "inner.py").write_text("X = 2\n")     # two imports away from a
    assert code_hash(code_files(listed, tmp_path), tmp_path) != before
