"""Jobs and schedules: the full graph on demand, and a nightly retrain of the value models."""

import dagster as dg

from assets.rollouts import all_shards_tags
from models.environment import read_env

ENV = read_env()     # read when the code location loads: a schedule's definition is fixed then

full_pipeline = dg.define_asset_job(
    "full_pipeline",
    selection=dg.AssetSelection.all(),
    description="Materialize the whole VAS graph on the active profile (VAS_PROFILE).",
)

# Fresh rollouts from the frozen base model (every shard, then the merge), value models refitted
# on them, then evaluated (decoding, and the value models' error against Monte-Carlo estimates) and reported.
RETRAIN_ASSETS = ["rollout_shards", "rollouts", "value_models", "evaluation", "value_error", "report"]

nightly_retrain = dg.define_asset_job(
    "nightly_retrain",
    selection=dg.AssetSelection.assets(*RETRAIN_ASSETS),
    # Every shard of rollout_shards in the run's one step (a partition-key range).
    tags=all_shards_tags(),
    description="Retrain: rollout_shards -> rollouts -> value_models -> evaluation, value_error -> report, on the current data.",
)

nightly_retrain_schedule = dg.ScheduleDefinition(
    name="nightly_retrain_schedule",
    job=nightly_retrain,
    cron_schedule=ENV.retrain_cron,
    execution_timezone=ENV.retrain_timezone,
    # Off until the user turns it on in the UI (Automation tab) or with VAS_RETRAIN_SCHEDULE=on.
    default_status=(dg.DefaultScheduleStatus.RUNNING if ENV.retrain_schedule == "on"
                    else dg.DefaultScheduleStatus.STOPPED),
    description="Nightly retrain at 02:00 (VAS_RETRAIN_TIMEZONE, default UTC).",
)
