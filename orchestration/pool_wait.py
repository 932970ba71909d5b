"""A step waiting for a pool slot sleeps between checks, and gives up with a message that names the
run holding the slot instead of waiting forever.

Dagster 1.13 retries a blocked claim after a back-off (1 s growing to 15 s), but its executors ask
how long to sleep through `InstanceConcurrencyContext.interval_to_next_pending_claim_check`, which
returns `min(0, time to the next retry)`: never more than 0, so the executor loop never sleeps and
a run waiting on a held `gpu` slot spins a core at 100% for as long as it waits. Nor does it stop
on SIGTERM or Ctrl-C: Dagster records the signal and acts on it when a step runs, and none does.
`install()` puts the intended interval in its place (the time to the next retry, at least 0),
ends a waiting run on a recorded signal, and fails a step that has waited longer than
VAS_POOL_WAIT_S seconds (default 3600; 0 waits forever) with a PoolWaitTimeout naming the holding
runs, their state, and how to free the slot.

Installed when the definitions load (orchestration/definitions.py), so the CLI, the UI's runs and
the daemon's all wait this way. tests/test_recovery.py measures the CPU of a waiting run.
"""

from __future__ import annotations

import os
import time

POOL_WAIT_ENV = "VAS_POOL_WAIT_S"
DEFAULT_POOL_WAIT_S = 3600.0


class PoolWaitTimeout(RuntimeError):
    """A step waited on a pool slot for longer than VAS_POOL_WAIT_S."""


def pool_wait_limit() -> float:
    raw = os.environ.get(POOL_WAIT_ENV, "")
    try:
        return float(raw) if raw.strip() else DEFAULT_POOL_WAIT_S
    except ValueError:
        raise ValueError(f"{POOL_WAIT_ENV} must be a number of seconds, got {raw!r}") from None


def holders_message(instance, pool: str) -> str:
    """Who holds the pool's slots, and how to free them."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    held = []
    for slot in info.claimed_slots:
        run = instance.get_run_by_id(slot.run_id)
        state = "gone" if run is None else run.status.value
        where = "" if run is None else f", pid {run.tags.get('vas/pid', '?')} on {run.tags.get('vas/host', '?')}"
        held.append(f"run {slot.run_id} ({state}{where}), step {slot.step_key}")
    holders = "; ".join(held) or "no run (the slots are free now)"
    return (f"pool {pool!r} ({info.slot_count} slot(s)) is held by {holders}. A run whose process is dead is "
            "failed and its slots freed by the next `vas` launch on its host; a live one frees them when it "
            "ends: stop its process, or terminate it in the UI (Runs -> Terminate).")


def install() -> None:
    """Replace Dagster's sleep interval for blocked claims by the intended one, with a wait limit."""
    from dagster._core.errors import DagsterExecutionInterruptedError
    from dagster._core.execution.plan import instance_concurrency_context as icc
    from dagster._utils import interrupts

    cls = icc.InstanceConcurrencyContext
    if getattr(cls, "_vas_pool_wait", False):
        return

    def interval_to_next_pending_claim_check(self) -> float:
        if not self._pending_claims:
            return 0.0
        # Dagster records SIGTERM/SIGINT outside a step's compute and acts on it only when a step
        # runs: a run that only waits would never see it. Here the wait is where the run is.
        if interrupts.pop_captured_interrupt():
            raise DagsterExecutionInterruptedError("interrupted while waiting for a pool slot")
        now = time.time()
        first = self.__dict__.setdefault("_vas_first_blocked", {})
        for step in self._pending_claims:
            first.setdefault(step, now)
        for step in list(first):
            if step not in self._pending_claims:
                del first[step]              # claimed at last: its wait is over
        limit = pool_wait_limit()
        waited = max(now - t for t in first.values())
        if limit > 0 and waited > limit:
            step = max(first, key=lambda s: now - first[s])
            pools = _pools_of(self, step)
            raise PoolWaitTimeout(f"step {step} waited {waited:.0f} s (over {POOL_WAIT_ENV}={limit:g}) for a pool slot. "
                                  + " ".join(holders_message(self._instance, p) for p in pools))
        return max(0.0, min([ready - now for ready in self._pending_timeouts.values()], default=1.0))

    cls.interval_to_next_pending_claim_check = interval_to_next_pending_claim_check
    cls._vas_pool_wait = True


def _pools_of(context, step_key: str) -> list[str]:
    """The pools a pending step of this run waits on, from the instance's pending-step records."""
    storage = context._instance.event_log_storage
    pools = []
    for info in storage.get_concurrency_infos(sorted(storage.get_concurrency_keys())).values():
        if any(p.run_id == context._run_id and p.step_key == step_key for p in info.pending_steps):
            pools.append(info.concurrency_key)
    return pools
