"""The one Dagster Definitions of the project: `dagster dev -w workspace.yaml` loads this."""

from __future__ import annotations

import dagster as dg

from assets import baselines, evaluation, ingest, report, rewards, rollouts, synthesis, training, validation, value_error
from assets.resources import build_resources
from orchestration.schedules import full_pipeline, nightly_retrain, nightly_retrain_schedule
from orchestration.sensors import incoming_preferences_sensor, incoming_retrain

ALL_ASSETS = dg.load_assets_from_modules([ingest, synthesis, rewards, rollouts, training, baselines, evaluation,
                                         value_error, report])
ALL_CHECKS = dg.load_asset_checks_from_modules([ingest, validation, rollouts])

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[full_pipeline, nightly_retrain, incoming_retrain],
    schedules=[nightly_retrain_schedule],
    sensors=[incoming_preferences_sensor],
    resources=build_resources(),
)
