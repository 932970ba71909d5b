"""Retrains end to end on the smoke profile, in a throwaway git + DVC repository.

Two preference files arrive one after the other in data/incoming/; the sensor screens each and
its run request is executed. Then: `vas lineage --diff` tells what changed, both value-model
versions exist side by side, an unchanged nightly retrain re-uses everything, and
`dvc checkout` of the first retrain's commit restores its exact datasets and models (also from
the DVC remote after the local cache is gone).
"""

import json
import os
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from dvc_repo import DVC, dvc_repo, sh

from models.artifacts import dvc_md5

pytestmark = pytest.mark.integration

TRACKED_OUTS = ["imported_preferences", "preference_pairs", "reward_models", "rollouts", "value_models"]


def preference_file(path: Path, prompts: list[str], chosen: str, rejected: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"prompt": prompts, "chosen": [f"{chosen} ({i})" for i in range(len(prompts))],
                  "rejected": [f"{rejected} ({i})" for i in range(len(prompts))],
                  "attribute": "positivity"}).to_csv(path, index=False)
    past = os.path.getmtime(path) - 60  # settled: not still being copied
    os.utime(path, (past, past))
    return path


@pytest.fixture(scope="module")
def retrains(smoke_world, tmp_path_factory):
    from assets.resources import VasSettings, build_resources
    from orchestration.definitions import ALL_ASSETS, ALL_CHECKS
    from orchestration.sensors import incoming_preferences_sensor, incoming_retrain

    repo = dvc_repo(tmp_path_factory.mktemp("repo"), smoke_world["data_dir"])
    remote = tmp_path_factory.mktemp("remote")
    sh(repo, DVC, "remote", "add", "-d", "local", str(remote))

    data = repo / "data"
    settings = VasSettings(profile="smoke", data_dir=str(data), device="cpu")
    resources = build_resources(settings)
    instance = smoke_world["instance"]
    prompts = pd.read_parquet(data / "prompts" / "prompts.parquet").prompt.tolist()[:12]

    def commit(message):
        sh(repo, DVC, "commit", "--force", "--quiet")
        sh(repo, DVC, "push", "--quiet")
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", message)
        return sh(repo, "git", "rev-parse", "HEAD").strip()

    def retrain(cursor):
        with dg.instance_for_test() as sensor_instance:
            tick = incoming_preferences_sensor(dg.build_sensor_context(
                instance=sensor_instance, cursor=cursor, resources={"settings": settings}))
        (request,) = tick.run_requests
        result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=incoming_retrain.selection,
                                resources=resources, run_config=request.run_config, instance=instance,
                                tags=request.tags)
        assert result.success
        return result, tick.cursor

    first = {"commit": None}
    preference_file(data / "incoming" / "batch_a.csv", prompts, "Lovely, works great", "Awful, broke")
    first["result"], cursor = retrain(None)
    first["md5s"] = {a: dvc_md5(data / a) for a in TRACKED_OUTS}
    first["commit"] = commit("retrain A")
    preference_file(data / "incoming" / "batch_b.csv", prompts[::-1], "Superb and sturdy", "Cheap junk")
    second_result, cursor = retrain(cursor)
    second = {"result": second_result, "md5s": {a: dvc_md5(data / a) for a in TRACKED_OUTS}}
    second["commit"] = commit("retrain B")
    return {"repo": repo, "data": data, "settings": settings, "resources": resources, "instance": instance,
            "first": first, "second": second, "cursor": cursor}


def test_each_file_retrains_on_the_merged_data(retrains):
    data = retrains["data"]
    imported = pd.read_parquet(data / "imported_preferences" / "pairs.parquet")
    assert imported.source_file.value_counts().to_dict() == {"batch_a.csv": 12, "batch_b.csv": 12}
    pairs = pd.read_parquet(data / "preference_pairs" / "pairs.parquet")
    assert set(imported.pair_id) <= set(pairs.pair_id)      # merged into the training pairs
    sources = json.loads((data / "imported_preferences" / "sources.json").read_text())
    assert [s["name"] for s in sources] == ["batch_a.csv", "batch_b.csv"]
    assert sources[1]["run_id"] == retrains["second"]["result"].run_id


def test_lineage_diff_reports_changed_and_unchanged_md5s(retrains, capsys):
    from orchestration.cli import main

    run_a, run_b = retrains["first"]["result"].run_id, retrains["second"]["result"].run_id
    assert main(["lineage", "--diff", run_a, run_b, "--data-dir", str(retrains["data"]), "--json"]) == 0
    diff = {e["asset"]: e for e in json.loads(capsys.readouterr().out)["assets"]}
    for asset in ("imported_preferences", "preference_pairs", "reward_models", "rollouts", "value_models"):
        assert diff[asset]["data"] == "changed", asset
        assert diff[asset]["md5_a"] == retrains["first"]["md5s"][asset]
        assert diff[asset]["md5_b"] == retrains["second"]["md5s"][asset]
        assert diff[asset]["code"] == "unchanged" and diff[asset]["git"] == "same"   # only the data moved
    for asset in ("corpus", "base_model", "prompts"):  # read by both retrains, materialized by neither
        assert diff[asset]["data"] == "unchanged" and diff[asset]["role_a"] == diff[asset]["role_b"] == "input"
        assert diff[asset]["md5_a"] == dvc_md5(retrains["data"] / ("corpus/corpus.parquet" if asset == "corpus"
                                                                   else asset))
    assert diff["imported_preferences"]["params"]["files"][1] != diff["imported_preferences"]["params"]["files"][0]
    assert main(["lineage", "--diff", run_a, run_b, "--data-dir", str(retrains["data"])]) == 0
    text = capsys.readouterr().out
    assert "value_models" in text and "changed" in text and "unchanged" in text


def test_both_value_model_versions_exist(retrains, capsys):
    from orchestration.cli import main

    data = retrains["data"]
    versions_dir = data / "value_model_versions"
    listed = {v["md5"]: v for v in json.loads((versions_dir / "versions.json").read_text())}
    for which in ("first", "second"):
        md5 = retrains[which]["md5s"]["value_models"]
        folder = versions_dir / md5.removesuffix(".dir")
        assert folder.is_dir() and dvc_md5(folder) == md5
        assert listed[md5]["run_id"] == retrains[which]["result"].run_id
    assert dvc_md5(data / "value_models") == retrains["second"]["md5s"]["value_models"]   # current = latest
    # An old version traces back to the data that made it.
    old = versions_dir / retrains["first"]["md5s"]["value_models"].removesuffix(".dir") / "positivity"
    assert main(["lineage", str(old), "--data-dir", str(data), "--json"]) == 0
    chain = {r["asset"]: r for r in json.loads(capsys.readouterr().out)["chain"]}
    assert chain["value_models"]["run_id"] == retrains["first"]["result"].run_id
    assert chain["imported_preferences"]["output_md5"] == retrains["first"]["md5s"]["imported_preferences"]


def test_unchanged_nightly_retrain_reuses_everything(retrains):
    from orchestration.definitions import ALL_ASSETS, ALL_CHECKS
    from orchestration.schedules import nightly_retrain

    data = retrains["data"]
    n_versions = len(json.loads((data / "value_model_versions" / "versions.json").read_text()))
    before = {a: dvc_md5(data / a) for a in ("rollouts", "value_models", "eval", "value_error", "report")}
    result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=nightly_retrain.selection,
                            resources=retrains["resources"], instance=retrains["instance"])
    assert result.success
    events = {e.asset_key.to_user_string(): e.event_specific_data.materialization
              for e in result.get_asset_materialization_events()}
    assert set(events) == {"rollout_shards", "rollouts", "value_models", "evaluation", "value_error", "report"}
    # The incoming retrains re-scored the shards (rollouts) but did not re-sample them (rollout_shards).
    shards = events.pop("rollout_shards")
    assert set(shards.metadata["reused_shards"].value) == {"0", "1"}
    for asset, mat in events.items():
        assert mat.metadata["reused_from_run"].value == retrains["second"]["result"].run_id, asset
    assert {a: dvc_md5(data / a) for a in before} == before
    assert len(json.loads((data / "value_model_versions" / "versions.json").read_text())) == n_versions


def test_dvc_checkout_of_the_older_commit_restores_its_data(retrains):
    repo, data = retrains["repo"], retrains["data"]
    first, second = retrains["first"], retrains["second"]
    try:
        sh(repo, "git", "checkout", "-q", first["commit"])
        sh(repo, DVC, "checkout", "--force", "--quiet")
        assert {a: dvc_md5(data / a) for a in TRACKED_OUTS} == first["md5s"]
        # From the remote alone: the local cache gone, `dvc pull` brings the first retrain back.
        sh(repo, "git", "checkout", "-q", second["commit"])
        sh(repo, DVC, "checkout", "--force", "--quiet")
        assert {a: dvc_md5(data / a) for a in TRACKED_OUTS} == second["md5s"]
        shutil.rmtree(repo / ".dvc" / "cache")
        sh(repo, "git", "checkout", "-q", first["commit"])
        sh(repo, DVC, "pull", "--force", "--quiet")
        assert {a: dvc_md5(data / a) for a in TRACKED_OUTS} == first["md5s"]
    finally:
        sh(repo, "git", "checkout", "-q", second["commit"])
        sh(repo, DVC, "pull", "--force", "--quiet")


def test_vas_ingest_retrains_on_good_files_and_refuses_bad_ones(smoke_world, tmp_path, monkeypatch, capsys):
    from orchestration.cli import main

    data = tmp_path / "data"
    shutil.copytree(smoke_world["data_dir"], data)
    # The CLI sets these for the process; monkeypatch puts them back afterwards.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("VAS_DATA_DIR", str(data))
    monkeypatch.setenv("VAS_PROFILE", "smoke")
    prompts = pd.read_parquet(data / "prompts" / "prompts.parquet").prompt.tolist()[:6]
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"prompt": prompts[:2], "chosen": ["fine", ""], "rejected": ["bad", "worse"]}).to_csv(bad, index=False)
    before = dvc_md5(data / "value_models")
    assert main(["ingest", str(tmp_path / "missing.csv"), "--data-dir", str(data), "--profile", "smoke"]) == 1
    assert "unreadable" in (err := capsys.readouterr().err) and "no such file" in err
    assert main(["ingest", str(bad), "--data-dir", str(data), "--profile", "smoke"]) == 1
    err = capsys.readouterr().err
    assert "row 2" in err and "'chosen'" in err and "no retrain" in err
    assert dvc_md5(data / "value_models") == before
    assert json.loads((data / "imported_preferences" / "sources.json").read_text()) == []

    good = preference_file(tmp_path / "good.csv", prompts, "Wonderful", "Dreadful")
    assert main(["ingest", str(good), "--data-dir", str(data), "--profile", "smoke"]) == 0
    assert dvc_md5(data / "value_models") != before
    sources = json.loads((data / "imported_preferences" / "sources.json").read_text())
    assert [s["name"] for s in sources] == ["good.csv"]
    versions = json.loads((data / "value_model_versions" / "versions.json").read_text())
    assert {before, dvc_md5(data / "value_models")} <= {v["md5"] for v in versions}
