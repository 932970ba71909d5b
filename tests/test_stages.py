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
