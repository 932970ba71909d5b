"""Group `evaluation`: each value model's error against Monte-Carlo estimates of its own target."""

from typing import Optional

import dagster as dg
import pandas as pd

from assets.common import load_held_out
from assets.metrics_db import metric_row
from assets.stage import Produced, StageRun, pipeline_asset
from models.artifacts import write_folder

METRIC_COLUMNS = ["mse", "spearman", "spearman_ceiling", "mc_noise_mse", "target_var", "n_states", "n_pairs"]


class ValueErrorAssetConfig(dg.Config):
    n_prompts: Optional[int] = None
    prefix_lengths: Optional[list[int]] = None
    n_candidates: Optional[int] = None
    n_continuations: Optional[int] = None
    betas: Optional[list[float]] = None


def value_error_config(run: StageRun):
    """The value_error section, with the completion budget of the rollouts the value models were fitted
    on (one declaration: rollouts.max_new_tokens), so the MC targets are values of the same pi0 episodes."""
    from models.evaluation.value_error import ValueErrorConfig

    return run.config_for(ValueErrorConfig, ignore=("rollouts",),
                          max_new_tokens=int(run.params["rollouts"]["max_new_tokens"]))


def reward_models_as_values(models, scorers, base, log) -> list:
    """ARGS's value estimate, measured beside the value models: each steered attribute's reward model
    read at every prefix (models/decoding/reward_guidance.py), in the units of that attribute's value models
    (their reward_stats), named `args.<attribute>`. A reward it cannot read per prefix is left out."""
    from models.decoding.reward_guidance import reward_as_value
    from models.evaluation.value_error import ScoredModel

    stats = {m.attribute: m.reward_stats for m in models}
    out = []
    for attribute, s in sorted(stats.items()):
        try:
            value = reward_as_value(scorers[attribute], scale=s["std"] or 1.0, offset=s["mean"],
                                    vocab_size=base.config.vocab_size)
        except (KeyError, ValueError) as err:
            log(f"value_error: no ARGS row for {attribute}: {err}")
            continue
        out.append(ScoredModel(f"args.{attribute}", value, attribute, "scalar", s))
    return out


@pipeline_asset("value_error", ValueErrorAssetConfig, group_name="evaluation", kinds={"pytorch", "parquet"},
                pool="gpu",
                description="Each value model's Q(s, a) against a Monte-Carlo estimate from pi0 continuations (mean "
                            "and soft values), at prefixes of held-out completions: mse, Spearman over pi0's top "
                            "candidates, and the MC noise floor; data/value_error/.")
def value_error(run: StageRun) -> Produced:
    # torch-backed modules load inside the assets that use them: `dagster dev` loads these definitions without torch
    from models.evaluation.value_error import evaluate_value_error, load_scored_models, markdown_table

    device, base, tokenizer, prompts, scorers = load_held_out(run)
    models = load_scored_models(run.path("value_models"), device=device)
    models += reward_models_as_values(models, scorers, base, run.log.info)
    metrics, pairs = evaluate_value_error(base, tokenizer, prompts, scorers, models,
                                          value_error_config(run), device=device)
    write_folder(run.path("value_error"), {"value_error.parquet": metrics, "pairs.parquet": pairs})

    rows = [metric_row(column, float(row[column]), split="eval", method=row.model,
                       params={"target": row.target, "parameterization": row.parameterization,
                               "attribute": row.attribute})
            for _, row in metrics.iterrows() for column in METRIC_COLUMNS if pd.notna(row[column])]
    mean = metrics[metrics.target == "mean"]
    headline = {f"{row.model}/mean_{column}": float(row[column])
                for _, row in mean.iterrows() for column in ("mse", "spearman") if pd.notna(row[column])}
    headline["mc_noise_mse"] = float(mean.mc_noise_mse.mean())
    table = markdown_table(metrics)
    run.log.info("value error against Monte-Carlo estimates:\n" + table)
    return Produced(headline, extra_rows=rows,
                    metadata={"value_error": dg.MetadataValue.md(table),
                              "n_states": int(mean.n_states.max()), "n_pairs": int(mean.n_pairs.max())})
