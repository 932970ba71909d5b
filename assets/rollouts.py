"""Group `rollouts`: K completions per training prompt from the frozen base model, scored by every reward."""

import json
from typing import Optional

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from assets.common import output_path, record_check
from assets.k8s import GPU_OP_TAGS
from assets.resources import VasSettings
from assets.stage import Produced, StageRun, pipeline_asset
from models.artifacts import write_folder
from models.rewards import GOLD_REWARDS
from models.validation import validate_rollouts


class RolloutsConfig(dg.Config):
    samples_per_prompt: Optional[int] = None
    max_new_tokens: Optional[int] = None


@pipeline_asset("rollouts", RolloutsConfig, group_name="rollouts", kinds={"pytorch", "parquet"}, pool="gpu",
                op_tags=GPU_OP_TAGS,
                description="Frozen pi0 samples for value training: token ids, pi0 log-probs, "
                            "learned and gold reward scores.")
def rollouts(run: StageRun) -> Produced:
    # torch-backed modules load inside the assets that use them: `dagster dev` loads these definitions without torch
    from models.lm import load_frozen_base, pick_device
    from models.reward_model import load_reward_models
    from models.rollouts import RolloutConfig, reward_stats, sample_rollouts, score_rollouts

    params = run.params
    device = str(pick_device(run.settings.device))
    model, tokenizer, _ = load_frozen_base(run.path("base_model"), device=device)
    prompts = pd.read_parquet(run.path("prompts") / "prompts.parquet")
    train_prompts = prompts[prompts.split == "train"].reset_index(drop=True)
    df = sample_rollouts(model, tokenizer, train_prompts, run.config_for(RolloutConfig),
                         device=device, progress=run.log.info)
    scorers = load_reward_models(run.path("reward_models"), device=device)
    df = score_rollouts(df, scorers, [a for a in scorers if a in GOLD_REWARDS])
    stats = {a: reward_stats(df, f"learned_{a}") for a in scorers}
    write_folder(run.path("rollouts"), {"rollouts.parquet": df, "reward_stats.json": stats, "params.json": params})
    metrics = {
        "n_rollouts": len(df),
        "n_prompts": int(df.prompt_id.nunique()),
        "mean_tokens": float(df.n_tokens.mean()),
        "finished_fraction": float(df.finished.mean()),
    }
    for column in df.columns:
        if column.startswith(("learned_", "gold_")):
            metrics[f"{column}_mean"] = float(df[column].mean())
            metrics[f"{column}_std"] = float(df[column].std())
    return Produced(metrics)


@dg.asset_check(asset="rollouts", blocking=True,
                description="GX: no empty completions, finite scores, counts as configured.")
def rollouts_suite(context: dg.AssetCheckExecutionContext, settings: VasSettings,
                   duckdb: DuckDBResource) -> dg.AssetCheckResult:
    folder = output_path(settings, "rollouts")
    # The parameters this materialization resolved (a launchpad override included), not the profile's.
    params = json.loads((folder / "params.json").read_text())
    df = pd.read_parquet(folder / "rollouts.parquet")
    prompts = pd.read_parquet(output_path(settings, "prompts") / "prompts.parquet")
    n_train = int((prompts.split == "train").sum())
    report = validate_rollouts(df, str(output_path(settings, "rollouts") / "rollouts.parquet"),
                               expected_rows=n_train * int(params["samples_per_prompt"]))
    counts = {"n_rows": len(df), "n_problems": len(report.problems),
              "n_failed_expectations": len(report.failed_expectations)}
    record_check(context, settings, duckdb, "rollouts_suite", "rollouts", report.success, counts)
    metadata = {**{k: dg.MetadataValue.int(v) for k, v in counts.items()},
                "failed_expectations": dg.MetadataValue.json(report.failed_expectations)}
    if report.problems:
        metadata["problems"] = dg.MetadataValue.md("\n".join(f"- {p}" for p in report.problems[:50]))
    return dg.AssetCheckResult(passed=report.success, metadata=metadata)
