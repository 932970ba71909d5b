"""Integration: `vas run` killed with SIGKILL at several points (inside an asset that holds the gpu
pool, inside the DuckDB writer, after the evaluation and before the report), then re-run: it
completes, says which dead run it recovered from, reproduces an uninterrupted run's evaluation,
leaves no temporary, and its metrics database opens with every asset's lineage row. On DVC's own
data/ (a throwaway copy of the project under git and DVC), `dvc status` is clean after the re-run.
SIGTERM and Ctrl-C (SIGINT) end a working run as failed with its slots freed. All on the smoke
profile, in a Dagster home and data folder of the test's own."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest
from dvc_repo import DVC, dvc_repo, sh

from models.profiles import PROJECT_ROOT
from orchestration.recovery import PID_START_TAG, PID_TAG, TEMPORARY, process_start

pytestmark = pytest.mark.integration
TIMING = ["seconds_per_sample"]          # wall-clock columns: the only ones a re-run may change


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    (root / "dagster_home").mkdir()
    shutil.copy(PROJECT_ROOT / "orchestration" / "dagster.yaml", root / "dagster_home" / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(root / "dagster_home"))
    env = {**os.environ, "DAGSTER_HOME": str(root / "dagster_home"), "DAGSTER_DISABLE_TELEMETRY": "1",
           "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    yield {"instance": instance, "env": env, "data": root / "data"}
    instance.dispose()


def launch(home, *extra: str, project: Path = PROJECT_ROOT) -> subprocess.Popen:
    """`vas run` of the smoke profile, from `project`'s code; on home's data folder unless that is
    the project's own data/ (its default)."""
    data = [] if home["data"] == project / "data" else ["--data-dir", str(home["data"])]
    child = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "run", "--profile", "smoke", *data, *extra],
                             cwd=project, env=home["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    child.started = process_start(child.pid)      # read while it runs: its run's tag, pid reuse aside
    return child


def run_of(instance, child, timeout: float = 120.0):
    """The child's run: tagged with its pid and that pid's start time (a pid an earlier child of
    this test had is not enough)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = [r for r in instance.get_runs() if r.tags.get(PID_TAG) == str(child.pid)
                and r.tags.get(PID_START_TAG) == child.started]
        if runs:
            return runs[0]
        assert child.poll() is None, "the child ended without a run" + ("" if child.stdout.closed else
                                                                      ":\n" + child.stdout.read()[-4000:])
        time.sleep(0.2)
    raise AssertionError("the child's run never started")


def wait_for(instance, child, asset: str, event: dg.DagsterEventType, timeout: float = 300.0) -> str:
    """Block until the child's run logs `event` for `asset`'s step; its run id."""
    run = run_of(instance, child)
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = instance.get_records_for_run(run.run_id, of_type=event).records
        if any(r.event_log_entry.step_key == asset for r in records):
            return run.run_id
        assert child.poll() is None, f"the run ended before {asset} {event}:\n" + child.stdout.read()[-4000:]
        time.sleep(0.1)
    raise AssertionError(f"{asset} never logged {event}")


def finish(home, *extra: str, project: Path = PROJECT_ROOT) -> tuple[str, str]:
    """A run to completion: (its run id, its output)."""
    child = launch(home, *extra, project=project)
    out, _ = child.communicate(timeout=900)
    assert child.returncode == 0, out[-4000:]
    return run_of(home["instance"], child).run_id, out


def temporaries(data) -> list:
    return [p for p in data.rglob(".*.tmp-*") if TEMPORARY.match(p.name)]


def check_whole(home, run_id: str, reference: pd.DataFrame) -> None:
    data = home["data"]
    assert temporaries(data) == []
    summary = pd.read_parquet(data / "eval" / "summary.parquet")
    pd.testing.assert_frame_equal(summary.drop(columns=TIMING), reference.drop(columns=TIMING))
    con = duckdb.connect(str(data / "metrics.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT asset, output_md5 FROM lineage WHERE run_id = ?", [run_id]).fetchall()
    finally:
        con.close()
    assets = {a.split("/")[0] for a, _ in rows}
    assert {"base_model", "value_models", "evaluation", "report"} <= assets and all(md5 for _, md5 in rows)


def test_killed_runs_are_recovered_and_reproduce_the_uninterrupted_run(home, smoke_world):
    instance = home["instance"]
    reference = pd.read_parquet(smoke_world["data_dir"] / "eval" / "summary.parquet")
    started = time.time()
    # Killed inside base_model, which holds the gpu pool's one slot.
    child = launch(home)
    dead = wait_for(instance, child, "base_model", dg.DagsterEventType.STEP_START)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.STARTED      # nobody ended it
    run_id, out = finish(home)
    assert f"recovered from dead run {dead}" in out
    assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
    check_whole(home, run_id, reference)

    # Killed inside the DuckDB writer (the report holds the duckdb_writer pool), then killed after the
    # evaluation and before the report: each time a forced run, re-run without force.
    for asset, event, delay in (("report", dg.DagsterEventType.STEP_START, 0.5),
                                ("evaluation", dg.DagsterEventType.STEP_SUCCESS, 0.0)):
        child = launch(home, "--force")
        dead = wait_for(instance, child, asset, event)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        run_id, out = finish(home)
        assert f"recovered from dead run {dead}" in out, out[-4000:]
        check_whole(home, run_id, reference)
    slots = instance.event_log_storage.get_concurrency_run_ids()
    assert slots == set(), f"slots still held by {slots}"
    print(f"fault injection: 3 kills and re-runs in {time.time() - started:.0f} s")


def test_a_run_killed_on_dvcs_data_folder_leaves_dvc_status_clean_after_the_rerun(home, smoke_world, tmp_path):
    """`vas run` on data/ records its outputs in dvc.lock (`dvc commit`) only when it completes: a
    run killed inside base_model records nothing and leaves nothing DVC would see, and the re-run
    records every stage."""
    project = dvc_repo(tmp_path / "project", smoke_world["data_dir"])
    sh(project, DVC, "config", "core.analytics", "false")
    sh(project, "git", "add", "-A")      # no dvc.lock yet: only the completed re-run writes one
    sh(project, "git", "commit", "-qm", "smoke world")
    on_data = {**home, "data": project / "data"}
    child = launch(on_data, "--force", project=project)
    dead = wait_for(home["instance"], child, "base_model", dg.DagsterEventType.STEP_START)
    child.send_signal(signal.SIGKILL)
    child.wait()
    run_id, out = finish(on_data, project=project)
    assert f"recovered from dead run {dead}" in out, out[-4000:]
    assert "dvc.lock updated" in out, out[-4000:]
    check_whole(on_data, run_id, pd.read_parquet(smoke_world["data_dir"] / "eval" / "summary.parquet"))
    assert (project / "dvc.lock").is_file()
    status = sh(project, DVC, "status", "--json")
    assert status.strip() in ("{}", ""), status


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("delay", [0.5, 1.5])          # into base_model's compute, or the steps after it
def test_sigterm_and_ctrl_c_end_a_working_run_as_failed_with_its_slots_freed(home, sig, delay):
    instance = home["instance"]
    child = launch(home, "--force")
    run_id = wait_for(instance, child, "base_model", dg.DagsterEventType.STEP_START)
    time.sleep(delay)
    child.send_signal(sig)
    out, _ = child.communicate(timeout=60)
    assert child.returncode != 0, out[-3000:]
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert run_id not in instance.event_log_storage.get_concurrency_run_ids()
