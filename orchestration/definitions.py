"""The one Dagster Definitions of the project: `dagster dev -w workspace.yaml` loads this."""

from __future__ import annotations

import dagster as dg

from assets import baselines, evaluation, report, rewards, rollouts, synthesis, training, validation
from orchestration.resources import build_resources

ALL_ASSETS = dg.load_assets_from_modules([synthesis, rewards, rollouts, training, baselines, evaluation, report])
ALL_CHECKS = dg.load_asset_checks_from_modules([validation, rollouts])

full_pipeline = dg.define_asset_job(
    "full_pipeline",
    selection=dg.AssetSelection.all(),
    description="Materialize the whole VAS graph on the active profile (VAS_PROFILE).",
)

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[full_pipeline],
    resources=build_resources(),
)
