"""The nightly retrain: its job, its schedule (off by default, 02:00 in a configurable zone)."""

import importlib
from datetime import datetime, timezone

import dagster as dg


def test_nightly_retrain_job_covers_rollouts_to_report():
    from orchestration.definitions import defs

    job = defs.resolve_job_def("nightly_retrain")
    keys = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert keys == {"rollout_shards", "rollouts", "value_models", "evaluation", "value_error", "report"}


def test_schedule_is_off_by_default_and_runs_the_retrain_at_two():
    from orchestration import schedules

    schedule = schedules.nightly_retrain_schedule
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.cron_schedule == "0 2 * * *" and schedule.execution_timezone == "UTC"
    context = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 11, 24, 2, 0, tzinfo=timezone.utc))
    requests = list(schedule.evaluate_tick(context).run_requests)
    assert len(requests) == 1 and requests[0].job_name in (None, "nightly_retrain")


def test_schedule_timezone_and_status_come_from_the_environment(monkeypatch):
    from orchestration import schedules

    monkeypatch.setenv("VAS_RETRAIN_TIMEZONE", "Europe/Berlin")
    monkeypatch.setenv("VAS_RETRAIN_SCHEDULE", "on")
    try:
        reloaded = importlib.reload(schedules)
        assert reloaded.nightly_retrain_schedule.execution_timezone == "Europe/Berlin"
        assert reloaded.nightly_retrain_schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    finally:
        monkeypatch.delenv("VAS_RETRAIN_TIMEZONE")
        monkeypatch.delenv("VAS_RETRAIN_SCHEDULE")
        importlib.reload(schedules)


def test_vas_lineage_traces_a_value_model_to_its_data(smoke_world, capsys):
    import json as _json

    from models.artifacts import dvc_md5
    from orchestration.cli import main

    data = smoke_world["data_dir"]
    assert main(["lineage", str(data / "value_models" / "positivity"), "--data-dir", str(data), "--json"]) == 0
    result = _json.loads(capsys.readouterr().out)
    by_asset = {row["asset"]: row for row in result["chain"]}
    assert result["asset"] == "value_models"
    assert {"value_models", "rollouts", "reward_models", "preference_pairs", "prompts", "base_model",
            "corpus"} <= set(by_asset)
    assert len(result["chain"]) == len(by_asset)          # each upstream asset once
    for asset, out in [("value_models", "value_models"), ("rollouts", "rollouts"), ("corpus", "corpus/corpus.parquet")]:
        row = by_asset[asset]
        assert row["output_md5"] == row["md5_on_disk"] == dvc_md5(data / out)
        assert row["run_id"] == smoke_world["result"].run_id and row["git_sha"]
    assert by_asset["rollouts"]["params"]["samples_per_prompt"] == 4
    assert any(m["metric"] == "base/gold_positivity" for m in result["evaluation"])
    # By run id: the whole run, from its most downstream asset.
    assert main(["lineage", smoke_world["result"].run_id, "--data-dir", str(data)]) == 0
    assert "produced by asset report" in capsys.readouterr().out
    assert main(["lineage", "no-such-run", "--data-dir", str(data)]) == 2


def test_vas_lineage_diff_reports_changed_and_unchanged(smoke_world, tmp_path, capsys):
    import json as _json
    import shutil

    from assets.resources import VasSettings, build_resources
    from assets.rollouts import RolloutsConfig
    from orchestration.cli import main
    from orchestration.definitions import ALL_ASSETS, ALL_CHECKS

    data = tmp_path / "data"
    shutil.copytree(smoke_world["data_dir"], data)
    run_a = smoke_world["result"].run_id
    retrain = dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets("rollout_shards", "rollouts", "value_models"),
        resources=build_resources(VasSettings(profile="smoke", data_dir=str(data), device="cpu")),
        run_config=dg.RunConfig(ops={"rollout_shards": RolloutsConfig(max_new_tokens=12),
                                     "rollouts": RolloutsConfig(max_new_tokens=12)}),
        instance=dg.DagsterInstance.ephemeral())
    assert retrain.success
    assert main(["lineage", "--diff", run_a, retrain.run_id, "--data-dir", str(data), "--json"]) == 0
    result = _json.loads(capsys.readouterr().out)
    by_asset = {e["asset"]: e for e in result["assets"]}
    assert by_asset["rollouts"]["data"] == "changed"
    assert by_asset["rollouts"]["params"]["max_new_tokens"] == [24, 12]
    assert by_asset["value_models"]["data"] == "changed"
    # The retrain did not materialize corpus, but read it (through base_model): unchanged input.
    assert by_asset["corpus"]["data"] == "unchanged" and by_asset["corpus"]["role_b"] == "input"
    assert main(["lineage", "--diff", run_a, run_a, "--data-dir", str(data), "--json"]) == 0
    same = _json.loads(capsys.readouterr().out)
    assert all(e["data"] == "unchanged" and not e["params"] for e in same["assets"]) and not same["metrics"]
    assert main(["lineage", "--diff", run_a, "--data-dir", str(data)]) == 2


def test_lineage_inputs_hash_every_source_by_content(tmp_path):
    from assets.common import lineage_inputs
    from assets.resources import VasSettings
    from models.artifacts import dvc_md5

    settings = VasSettings(profile="smoke", data_dir=str(tmp_path / "data"), device="cpu")
    a, b = tmp_path / "rm_a", tmp_path / "rm_b.bin"
    a.mkdir()
    (a / "model.safetensors").write_bytes(b"weights-1")
    b.write_bytes(b"other")
    inputs = lineage_inputs(settings, [], [str(a), str(b)])
    assert inputs == {f"source:{a}": dvc_md5(a), f"source:{b}": dvc_md5(b)}
    (a / "model.safetensors").write_bytes(b"weights-2")   # same path, new contents: a new input
    assert lineage_inputs(settings, [], [str(a)])[f"source:{a}"] != inputs[f"source:{a}"]
    assert lineage_inputs(settings, [], str(b)) == {f"source:{b}": dvc_md5(b)}
