"""A run killed before it could end (SIGKILL) is found at the next launch, marked failed and its
pool slots freed; a live run is never touched (orchestration/recovery.py)."""

import os
import socket
import subprocess

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun

from orchestration.recovery import HOST_TAG, PID_START_TAG, PID_TAG, launch_tags, process_alive, process_start, recover_dead_runs


@pytest.fixture
def instance(tmp_path):
    with dg.DagsterInstance.local_temp(str(tmp_path), overrides={
            "concurrency": {"pools": {"granularity": "op", "default_limit": 1}}}) as inst:
        yield inst


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    return child.pid


def started_run(instance, run_id: str, tags: dict, pool: str | None = None) -> None:
    instance.add_run(DagsterRun(job_name="__ASSET_JOB", run_id=run_id, status=dg.DagsterRunStatus.STARTED, tags=tags))
    if pool:
        storage = instance.event_log_storage
        storage.initialize_concurrency_limit_to_default(pool)
        assert storage.claim_concurrency_slot(pool, run_id, f"{run_id}_step", 0).is_claimed


def holders(instance, pool: str) -> list[str]:
    return [slot.run_id for slot in instance.event_log_storage.get_concurrency_info(pool).claimed_slots]


def test_a_dead_runs_slot_is_freed_and_the_run_marked_failed(instance):
    host = socket.gethostname()
    started_run(instance, "dead", {HOST_TAG: host, PID_TAG: str(dead_pid())}, pool="gpu")
    lines = []
    assert recover_dead_runs(instance, lines.append) == ["dead"]
    assert instance.get_run_by_id("dead").status == dg.DagsterRunStatus.FAILURE
    assert holders(instance, "gpu") == []
    assert len(lines) == 1 and "dead run dead" in lines[0] and "slots freed" in lines[0]
    failure = [e for e in instance.all_logs("dead") if e.dagster_event and e.dagster_event.event_type_value
               == "PIPELINE_FAILURE"]
    assert failure and "is gone" in failure[0].dagster_event.message
    assert recover_dead_runs(instance, lines.append) == []                # once is enough


def test_a_live_run_is_never_touched(instance):
    """Another `vas run` in another shell: its process is alive, so its run and slot stay."""
    started_run(instance, "alive", launch_tags(), pool="gpu")
    # A run of another host cannot be judged from here either.
    started_run(instance, "elsewhere", {HOST_TAG: "another-host", PID_TAG: str(dead_pid())}, pool="duckdb")
    # Nor one launched without these tags (the daemon's, whose run monitoring handles it).
    started_run(instance, "untagged", {})
    assert recover_dead_runs(instance, lambda _: None) == []
    for run_id in ("alive", "elsewhere", "untagged"):
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED
    assert holders(instance, "gpu") == ["alive"] and holders(instance, "duckdb") == ["elsewhere"]


def test_a_reused_pid_does_not_keep_a_dead_run_alive(instance):
    """The pid now belongs to another process (this one) that started later than the dead run's."""
    tags = launch_tags() | {PID_START_TAG: "1"}
    assert process_alive(os.getpid(), launch_tags()[PID_START_TAG]) and not process_alive(os.getpid(), "1")
    started_run(instance, "reused", tags, pool="gpu")
    assert recover_dead_runs(instance, lambda _: None) == ["reused"]
    assert holders(instance, "gpu") == []


def test_slots_left_by_a_run_that_ended_are_freed(instance):
    started_run(instance, "ended", launch_tags(), pool="gpu")
    instance.report_run_failed(instance.get_run_by_id("ended"), message="ended without freeing its slot")
    lines = []
    assert recover_dead_runs(instance, lines.append) == ["ended"]
    assert holders(instance, "gpu") == [] and "ended FAILURE" in lines[0]


# -- a run waiting on a held pool: cheap, bounded, and stoppable (a real `vas materialize`) --------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def held_gpu(tmp_path):
    """A Dagster home whose `gpu` slot is held by a live run (a sleeping process's), and the env a
    `vas materialize` there runs with."""
    import shutil

    from models.profiles import PROJECT_ROOT

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "orchestration" / "dagster.yaml", home / "dagster.yaml")
    holder = subprocess.Popen(["sleep", "600"])
    instance = dg.DagsterInstance.from_config(str(home))
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(holder.pid)}
    started_run(instance, "holder", tags | {PID_START_TAG: process_start(holder.pid)}, pool="gpu")
    env = {**os.environ, "DAGSTER_HOME": str(home), "VAS_PROFILE": "smoke", "VAS_DATA_DIR": str(tmp_path / "data"),
           "DAGSTER_DISABLE_TELEMETRY": "1", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "False"}
    yield instance, env
    holder.kill()
    holder.wait()
    instance.dispose()


def launch_base_model(env: dict, wait_s: float):
    import sys

    from models.profiles import PROJECT_ROOT

    return subprocess.Popen([sys.executable, "-m", "orchestration.cli", "materialize", "corpus", "base_model"],
                            cwd=PROJECT_ROOT, env=env | {"VAS_POOL_WAIT_S": str(wait_s)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_blocked(instance, child, timeout: float = 120.0) -> str:
    """The run id of the child's run once one of its steps waits on the gpu pool."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert child.poll() is None, child.stdout.read()
        pending = [p.run_id for p in instance.event_log_storage.get_concurrency_info("gpu").pending_steps
                   if p.run_id != "holder"]
        if pending:
            return pending[0]
        time.sleep(0.5)
    raise AssertionError("the run never waited on the gpu pool")


@pytest.mark.integration
def test_a_waiting_run_sleeps_and_ends_promptly_on_sigterm(held_gpu):
    import signal
    import time

    instance, env = held_gpu
    child = launch_base_model(env, wait_s=600)
    try:
        run_id = wait_until_blocked(instance, child)
        before, start = cpu_seconds(child.pid), time.time()
        time.sleep(8)
        share = (cpu_seconds(child.pid) - before) / (time.time() - start)
        assert share < 0.05, f"a waiting run used {share:.0%} of a core"
        child.send_signal(signal.SIGTERM)
        start = time.time()
        child.wait(timeout=30)
        assert time.time() - start < 10 and child.returncode != 0
    finally:
        child.kill()
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    info = instance.event_log_storage.get_concurrency_info("gpu")
    assert [s.run_id for s in info.claimed_slots] == ["holder"]                 # nothing of its own left
    assert all(p.run_id == "holder" for p in info.pending_steps)


@pytest.mark.integration
def test_a_run_that_waits_too_long_fails_naming_the_holder(held_gpu):
    instance, env = held_gpu
    child = launch_base_model(env, wait_s=3)
    out, _ = child.communicate(timeout=180)
    assert child.returncode != 0
    assert "VAS_POOL_WAIT_S" in out and "run holder (STARTED" in out, out[-3000:]
    assert instance.get_run_by_id("holder").status == dg.DagsterRunStatus.STARTED   # alive: left alone


def test_the_project_instance_turns_run_monitoring_on(tmp_path):
    """The daemon's path (UI, schedule, sensor): Dagster's run monitoring, with the slots of ended
    runs freed (orchestration/dagster.yaml), loaded through Dagster's own schema."""
    import shutil

    from models.profiles import PROJECT_ROOT

    shutil.copy(PROJECT_ROOT / "orchestration" / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
        assert instance.run_monitoring_start_timeout_seconds == 180
    finally:
        instance.dispose()


def test_temporaries_go_only_when_no_other_run_may_own_them(instance, tmp_path):
    from orchestration.recovery import remove_dead_temporaries

    data = tmp_path / "data"
    (data / "sub" / ".base_model.tmp-0123abcd").mkdir(parents=True)
    (data / ".summary.parquet.tmp-89abcdef").write_text("half")
    (data / "kept.tmp-0123abcd").write_text("not hidden: not an atomic temporary")
    (data / ".checkpoints").mkdir()
    started_run(instance, "writing", launch_tags() | {PID_TAG: str(os.getppid())})     # a live writer
    lines = []
    assert remove_dead_temporaries(instance, data, lines.append) == []
    assert (data / ".summary.parquet.tmp-89abcdef").exists() and "run writing is still STARTED" in lines[0]
    instance.report_run_failed(instance.get_run_by_id("writing"), message="done")
    removed = remove_dead_temporaries(instance, data, lines.append)
    assert sorted(p.name for p in removed) == [".base_model.tmp-0123abcd", ".summary.parquet.tmp-89abcdef"]
    assert sorted(p.name for p in data.iterdir()) == [".checkpoints", "kept.tmp-0123abcd", "sub"]
    assert list((data / "sub").iterdir()) == [] and "removed 2 temporaries" in lines[-1]


def test_an_interrupt_a_callback_swallowed_still_fails_the_step():
    """Python drops an exception raised from a signal handler into a GC callback ("Exception
    ignored in ..."): the step must still fail when its compute ends."""
    import signal

    from dagster._core import errors
    from dagster._core.errors import DagsterExecutionInterruptedError

    from orchestration import interrupts

    interrupts.install()
    # What SIGINT did before: Python's default_int_handler, or SIG_IGN where a shell started the
    # tests in the background (`cmd &`).
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(DagsterExecutionInterruptedError):
        with errors.raise_execution_interrupts():
            handler = signal.getsignal(signal.SIGTERM)
            try:                                     # what a weakref callback does with it
                handler(signal.SIGTERM, None)
            except DagsterExecutionInterruptedError:
                pass
    # An interrupt that propagates is raised once, and nothing stays pending.
    with pytest.raises(DagsterExecutionInterruptedError):
        with errors.raise_execution_interrupts():
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    with errors.raise_execution_interrupts():
        pass
    assert signal.getsignal(signal.SIGINT) is before                          # handlers restored
