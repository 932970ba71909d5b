"""The one Dagster Definitions of the project: `dagster dev -w workspace.yaml` loads this."""

from __future__ import annotations

import dagster as dg

from assets import baselines, evaluation, ingest, report, rewards, rollouts, synthesis, training, validation, value_error
from assets.resources import build_resources
from models.environment import read_env
from orchestration import interrupts, pool_wait
from orchestration.schedules import full_pipeline, nightly_retrain, nightly_retrain_schedule
from orchestration.sensors import incoming_preferences_sensor, incoming_retrain

# In every process that runs these assets (the CLI, the UI's and the daemon's run workers): a step
# blocked on a pool sleeps between checks and gives up after VAS_POOL_WAIT_S, and SIGTERM/Ctrl-C end a
# step even when Python drops the first interrupt.
pool_wait.install()
interrupts.install()

ALL_ASSETS = dg.load_assets_from_modules([ingest, synthesis, rewards, rollouts, training, baselines, evaluation,
                                         value_error, report])
ALL_CHECKS = dg.load_asset_checks_from_modules([ingest, validation, rollouts])


def executor_for(name: str) -> dg.ExecutorDefinition | None:
    """The executor of every job: Dagster's default (a process per step, on this machine) unless
    VAS_EXECUTOR=k8s, which runs each step as a Kubernetes Job (deploy/README.md). dagster-k8s is
    imported only then: a plain install without the `k8s` extra still loads this code location."""
    if name == "default":
        return None
    if name == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    raise ValueError(f"VAS_EXECUTOR={name!r}: expected 'default' or 'k8s'")


def build_defs() -> dg.Definitions:
    """The Definitions, with the executor VAS_EXECUTOR names when called."""
    return dg.Definitions(
        assets=ALL_ASSETS,
        asset_checks=ALL_CHECKS,
        jobs=[full_pipeline, nightly_retrain, incoming_retrain],
        schedules=[nightly_retrain_schedule],
        sensors=[incoming_preferences_sensor],
        resources=build_resources(),
        executor=executor_for(read_env().executor),
    )


defs = build_defs()
