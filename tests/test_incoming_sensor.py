"""The data/incoming/ sensor, evaluated with Dagster's sensor test context (no runs launched)."""

import json
import os
import time

import dagster as dg
import pandas as pd
import pytest

from assets.resources import VasSettings
from models.artifacts import file_md5
from orchestration.sensors import CHECK_NAME, incoming_preferences_sensor

GOOD_ROWS = [
    {"prompt": "The blender", "chosen": "works great and I love it.", "rejected": "broke after a day, awful.",
     "attribute": "positivity"},
    {"prompt": "This lamp", "chosen": "is bright, sturdy and lovely.", "rejected": "flickers and feels cheap.",
     "attribute": "positivity"},
]


def write_pairs(path, rows, age_s: float = 60.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    # Old enough to be past the settle time (a file still being copied is left for later).
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("VAS_INCOMING_SETTLE_SECONDS", "5")
    settings = VasSettings(profile="smoke", data_dir=str(tmp_path / "data"), device="cpu")
    with dg.instance_for_test() as instance:
        yield {"settings": settings, "incoming": tmp_path / "data" / "incoming", "instance": instance}


def tick(world, cursor=None):
    context = dg.build_sensor_context(instance=world["instance"], cursor=cursor,
                                      resources={"settings": world["settings"]})
    return incoming_preferences_sensor(context)


def test_no_files_is_a_skip(world):
    result = tick(world)
    assert not result.run_requests and "no new files" in result.skip_reason.skip_message
    assert json.loads(result.cursor) == {}


def test_good_file_requests_one_retrain_and_is_never_processed_twice(world):
    path = write_pairs(world["incoming"] / "batch1.csv", GOOD_ROWS)
    md5 = file_md5(path)
    first = tick(world)
    assert len(first.run_requests) == 1 and not first.asset_events
    request = first.run_requests[0]
    assert request.run_config == {"ops": {"imported_preferences": {"config": {"files": [str(path)]}}}}
    assert request.run_key == f"incoming-{md5[:12]}" and request.tags["vas/incoming"] == "batch1.csv"
    assert json.loads(first.cursor) == {md5: "batch1.csv"}

    # Same cursor: nothing new, even when the same content arrives again under another name.
    again = tick(world, first.cursor)
    assert not again.run_requests and again.skip_reason is not None
    write_pairs(world["incoming"] / "batch1-copy.csv", GOOD_ROWS)
    assert not tick(world, first.cursor).run_requests

    # The file edited in place is new content: processed once more.
    write_pairs(path, GOOD_ROWS[:1])
    edited = tick(world, first.cursor)
    assert len(edited.run_requests) == 1 and file_md5(path) in json.loads(edited.cursor)


def test_bad_file_records_a_failed_check_with_reasons_and_requests_no_retrain(world):
    bad_rows = [GOOD_ROWS[0], {**GOOD_ROWS[1], "chosen": ""}, {**GOOD_ROWS[1], "attribute": "sarcasm"}]
    path = write_pairs(world["incoming"] / "bad.csv", bad_rows)
    raw = path.read_bytes()
    result = tick(world)
    assert not result.run_requests
    (check,) = result.asset_events
    assert isinstance(check, dg.AssetCheckEvaluation)
    assert check.asset_key == dg.AssetKey("imported_preferences") and check.check_name == CHECK_NAME
    assert check.passed is False and check.severity == dg.AssetCheckSeverity.ERROR
    problems = check.metadata["problems"].value
    # Reasons name file, row and column: row 2 has an empty `chosen`, row 3 an unknown attribute.
    assert "bad.csv" in problems and "| 2 | chosen |" in problems and "| 3 | attribute |" in problems
    assert check.metadata["n_bad_rows"].value == 2
    quarantine = check.metadata["quarantine_file"].value
    quarantined = pd.read_csv(quarantine)
    assert sorted(quarantined.source_row) == [2, 3] and quarantined.reason.str.len().min() > 0
    assert path.read_bytes() == raw                        # the raw file is never modified
    # Not processed twice: the next tick neither retrains nor reports it again.
    later = tick(world, result.cursor)
    assert not later.run_requests and not later.asset_events


def test_missing_column_and_empty_file_fail(world):
    write_pairs(world["incoming"] / "no_rejected.csv", [{k: v for k, v in r.items() if k != "rejected"}
                                                        for r in GOOD_ROWS])
    (world["incoming"] / "empty.csv").write_text("prompt,chosen,rejected\n")
    past = time.time() - 60
    os.utime(world["incoming"] / "empty.csv", (past, past))
    result = tick(world)
    assert not result.run_requests
    reasons = {e.metadata["file"].value.rsplit("/", 1)[-1]: e.metadata["problems"].value for e in result.asset_events}
    assert "missing required column" in reasons["no_rejected.csv"] and "rejected" in reasons["no_rejected.csv"]
    assert "no preference pairs" in reasons["empty.csv"] or "no rows" in reasons["empty.csv"]


def test_good_and_bad_files_in_one_tick(world):
    good = write_pairs(world["incoming"] / "a_good.csv", GOOD_ROWS)
    write_pairs(world["incoming"] / "b_bad.csv", [{**GOOD_ROWS[0], "rejected": GOOD_ROWS[0]["chosen"]}])
    result = tick(world)
    assert len(result.run_requests) == 1 and len(result.asset_events) == 1
    files = result.run_requests[0].run_config["ops"]["imported_preferences"]["config"]["files"]
    assert files == [str(good)]
    assert "b_bad.csv" in result.asset_events[0].metadata["file"].value


def test_files_still_being_written_wait(world):
    write_pairs(world["incoming"] / "fresh.csv", GOOD_ROWS, age_s=0)
    (world["incoming"] / "upload.csv.part").write_text("prompt,chosen\n")
    (world["incoming"] / "notes.txt").write_text("not a data file")
    result = tick(world)
    assert not result.run_requests and json.loads(result.cursor) == {}


def test_sensor_is_on_by_default_and_targets_the_incoming_retrain():
    from orchestration.definitions import defs

    assert incoming_preferences_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    job = defs.resolve_job_def("incoming_retrain")
    keys = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert keys == {"imported_preferences", "preference_pairs", "reward_models", "dpo_model", "rollouts",
                    "value_models", "evaluation", "value_error", "report"}
    assert defs.resolve_sensor_def("incoming_preferences_sensor").job_name == "incoming_retrain"


def test_imported_preferences_merges_good_files_once_and_refuses_bad_ones(world):
    from assets.ingest import imported_preferences, imported_preferences_suite
    from assets.resources import build_resources
    from models.artifacts import dvc_md5

    resources = build_resources(world["settings"])
    out = world["settings"].path("imported_preferences")

    def merge(*files):
        return dg.materialize([imported_preferences, imported_preferences_suite], resources=resources,
                              instance=world["instance"], raise_on_error=False,
                              run_config={"ops": {"imported_preferences": {"config": {"files": [str(f) for f in files]}}}})

    bad = write_pairs(world["incoming"] / "bad.csv", [{**GOOD_ROWS[0], "prompt": ""}])
    refused = merge(bad)       # launched by hand from the launchpad, past the sensor
    assert not refused.success and not out.exists()
    failure = [e for e in refused.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "bad.csv" in failure.event_specific_data.error.message

    good = write_pairs(world["incoming"] / "good.csv", GOOD_ROWS)
    merged = merge(good)
    assert merged.success and all(c.passed for c in merged.get_asset_check_evaluations())
    table = pd.read_parquet(out / "pairs.parquet")
    assert len(table) == 2 and set(table.source_file) == {"good.csv"}
    assert table.pair_id.str.startswith(file_md5(good)[:8]).all()
    version = dvc_md5(out)
    again = merge(good)        # the same content again adds nothing
    assert again.success and len(pd.read_parquet(out / "pairs.parquet")) == 2
    mat = again.get_asset_materialization_events()[0].event_specific_data.materialization
    assert mat.metadata["n_new_files"].value == 0 and dvc_md5(out) == version

