"""The one Dagster Definitions of the project: `dagster dev -w workspace.yaml` loads this."""

from __future__ import annotations

import dagster as dg

from assets import baselines, evaluation, report, rewards, rollouts, synthesis, training, validation
from orchestration.resources import build_resources
from orchestration.schedules import full_pipeline, nightly_retrain, nightly_retrain_schedule

ALL_ASSETS = dg.load_assets_from_modules([synthesis, rewards, rollouts, training, baselines, evaluation, report])
ALL_CHECKS = dg.load_asset_checks_from_modules([validation, rollouts])

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[full_pipeline, nightly_retrain],
    schedules=[nightly_retrain_schedule],
    resources=build_resources(),
)
