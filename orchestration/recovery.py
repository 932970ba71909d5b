"""Runs that died without ending: found when the next one launches, marked failed, slots freed.

A `vas` command runs its assets in its own process (dg.materialize). Killed by SIGKILL (the OOM
killer, a CI timeout, a lost machine), that process cannot end its run: the run stays STARTED in
the instance and keeps the pool slot it held (`gpu`, `duckdb`), so every later run waits on that
slot forever. Each run launched here records its host, pid and the pid's start time as tags; at
the next launch, a STARTED or STARTING run whose process is gone (no such pid, or the pid now
belongs to a process that started later) is marked failed with an engine event saying why, and its
slots are freed. A run whose process is alive, such as a `vas run` in another shell, is never
touched. Slots still claimed by runs that already ended are freed too.

Temporaries of dead writers (models.artifacts.atomic_path's `.<name>.tmp-<hex>` siblings) are then
removed from the data folder, but only when no other run of this instance is STARTED or STARTING:
a live run, or one whose process this host cannot judge, may still be writing its own.

Runs the UI, schedule or sensor launch go through the daemon, whose run monitoring
(orchestration/dagster.yaml) fails their dead workers the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable

HOST_TAG, PID_TAG, PID_START_TAG = "vas/host", "vas/pid", "vas/pid_start"
TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")      # models.artifacts._tmp_sibling's names


def process_start(pid: int) -> str:
    """The start time of a process in clock ticks since boot (/proc/<pid>/stat, field 22), "" where
    /proc cannot tell: with the pid it names one process, not whichever reuses that pid later."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]        # fields after "(comm)": state is field 3


def launch_tags() -> dict[str, str]:
    """Tags that tie a run to the process running it."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PID_START_TAG: process_start(pid)}


def process_alive(pid: int, started: str = "") -> bool:
    """Whether the process that had this pid (and, when known, this start time) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process: alive
        pass
    return not started or not (now := process_start(pid)) or now == started


def dead_runs(instance) -> list:
    """STARTED/STARTING runs launched on this host whose process is gone."""
    import dagster as dg

    here = socket.gethostname()
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED,
                                                            dg.DagsterRunStatus.STARTING]))
    return [run for run in runs
            if run.tags.get(HOST_TAG) == here and run.tags.get(PID_TAG, "").isdigit()
            and not process_alive(int(run.tags[PID_TAG]), run.tags.get(PID_START_TAG, ""))]


def recover_dead_runs(instance, log: Callable[[str], None] = print) -> list[str]:
    """Mark this host's dead runs failed and free their pool slots, and those of runs that ended
    holding one; one log line per run. Returns the run ids recovered from."""
    recovered = []
    for run in dead_runs(instance):
        pid, host = run.tags[PID_TAG], run.tags[HOST_TAG]
        instance.report_run_failed(run, message=f"its process (pid {pid} on {host}) is gone: killed before the "
                                                "run could end; marked failed by the next vas launch")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log(f"recovered from dead run {run.run_id}: process {pid} on {host} is gone; "
            "marked failed, its pool slots freed")
        recovered.append(run.run_id)
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in sorted(storage.get_concurrency_run_ids() - set(recovered)):
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
                log(f"freed the pool slots still held by run {run_id}, which "
                    + ("no longer exists" if run is None else f"ended {run.status.value}"))
                recovered.append(run_id)
    return recovered


def unfinished_runs(instance) -> list:
    """STARTED or STARTING runs of the instance other than this process's own."""
    import dagster as dg

    mine = str(os.getpid())
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED,
                                                            dg.DagsterRunStatus.STARTING]))
    return [run for run in runs if not (run.tags.get(HOST_TAG) == socket.gethostname()
                                        and run.tags.get(PID_TAG) == mine)]


def remove_dead_temporaries(instance, data_dir: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Remove the atomic-write temporaries under data_dir when no other run could own them
    (recover_dead_runs first, so a dead run does not count); returns what was removed."""
    root = Path(data_dir)
    if not root.is_dir():
        return []
    found = sorted(p for p in root.rglob(".*.tmp-*") if TEMPORARY.match(p.name))
    if not found:
        return []
    if others := unfinished_runs(instance):
        log(f"left {len(found)} temporaries under {root}: run {others[0].run_id} is still "
            f"{others[0].status.value} and may own them")
        return []
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    log(f"removed {len(found)} temporaries of dead writers under {root}: "
        + ", ".join(str(p.relative_to(root)) for p in found[:5]) + (" ..." if len(found) > 5 else ""))
    return found
