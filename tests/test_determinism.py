"""Same seed, same data, same code: re-materializing gives the same rollouts, value-model weights
and evaluation metrics (fixed thread count and deterministic torch kernels, assets.common.torch_threads)."""

import json
import shutil

import pandas as pd
import pytest

from models.artifacts import dvc_md5

pytestmark = pytest.mark.integration
RETRAINED = ("rollout_shards", "rollouts", "value_models", "evaluation")
TIMING_COLUMNS = ["seconds_per_sample"]


def fingerprints(data) -> dict[str, str]:
    """md5 of the rollout shards, the rollouts folder and every value model's weights."""
    found = {"rollout_shards": dvc_md5(data / "rollout_shards"), "rollouts": dvc_md5(data / "rollouts")}
    for folder in sorted(p for p in (data / "value_models").iterdir() if p.is_dir()):
        # A head on a frozen backbone (the distilled one) saves its backbone by reference: no model.safetensors.
        frozen = json.loads((folder / "value_config.json").read_text()).get("backbone_frozen", False)
        for name in ("value_head.safetensors",) + (() if frozen else ("model.safetensors",)):
            found[f"value_models/{folder.name}/{name}"] = dvc_md5(folder / name)
    return found


def numeric_summary(data) -> pd.DataFrame:
    summary = pd.read_parquet(data / "eval" / "summary.parquet")
    keep = [c for c in summary.select_dtypes("number").columns if c not in TIMING_COLUMNS]
    return summary[["method", "params", *keep]].sort_values(["method", "params"]).reset_index(drop=True)


def test_forced_rematerialization_reproduces_outputs_exactly(smoke_world, tmp_path):
    import dagster as dg

    from assets.common import FORCE_TAG
    from assets.resources import VasSettings, build_resources
    from orchestration.definitions import ALL_ASSETS, ALL_CHECKS

    data = tmp_path / "data"
    shutil.copytree(smoke_world["data_dir"], data)
    before, summary_before = fingerprints(data), numeric_summary(data)
    assert len(before) > 2   # rollouts and at least one value model's two weight files

    settings = VasSettings(profile="smoke", data_dir=str(data), device="cpu")
    result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets(*RETRAINED),
                            resources=build_resources(settings), instance=dg.DagsterInstance.ephemeral(),
                            tags={FORCE_TAG: "true"})
    assert result.success
    events = {e.asset_key.to_user_string(): e.event_specific_data.materialization
              for e in result.get_asset_materialization_events()}
    assert set(events) == set(RETRAINED)
    assert all("reused_from_run" not in m.metadata for m in events.values())   # recomputed, not re-used

    assert fingerprints(data) == before
    pd.testing.assert_frame_equal(numeric_summary(data), summary_before, check_exact=True)


# A fresh interpreter: another hash seed (set and dict orders of strings), fresh torch state.
FRESH_PROCESS = """
import sys
import dagster as dg
from assets.common import FORCE_TAG
from assets.resources import VasSettings, build_resources
from orchestration.definitions import ALL_ASSETS, ALL_CHECKS

settings = VasSettings(profile="smoke", data_dir=sys.argv[1], device="cpu")
result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets(*sys.argv[2:]),
                        resources=build_resources(settings), instance=dg.DagsterInstance.ephemeral(),
                        tags={FORCE_TAG: "true"}, raise_on_error=False)
sys.exit(0 if result.success else 1)
"""


def test_rematerialization_in_a_fresh_process_reproduces_outputs_exactly(smoke_world, tmp_path):
    import os
    import subprocess
    import sys

    from models.profiles import PROJECT_ROOT

    data = tmp_path / "data"
    shutil.copytree(smoke_world["data_dir"], data)
    before, summary_before = fingerprints(data), numeric_summary(data)
    env = {**os.environ, "VAS_PROFILE": "smoke", "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(data), *RETRAINED], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert fingerprints(data) == before
    pd.testing.assert_frame_equal(numeric_summary(data), summary_before, check_exact=True)
