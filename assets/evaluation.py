"""Group `evaluation`: every method on the held-out prompts, same seeds; all samples stored."""

import json
from typing import Optional

import dagster as dg
import pandas as pd

from assets.baselines import DPO_SKIPPED
from assets.common import load_held_out
from assets.metrics_db import metric_row
from assets.stage import Produced, StageRun, pipeline_asset
from models.artifacts import write_folder
from models.rewards.rewards import GOLD_REWARDS
from models.value.value_store import load_value_models

HEADLINE_COLUMNS = ["method", "params", "gold_positivity_mean", "gold_positivity_ci95", "gold_conciseness_mean",
                    "gold_conciseness_ci95", "learned_positivity_mean", "kl_nats_mean", "gold_positivity_winrate",
                    "distinct_2", "repeat_4gram_share", "mean_tokens", "seconds_per_sample", "base_forwards_per_sample"]


WORLD_FILE = "world.json"    # what the evaluated world is, for the report (report.world_section)


def world_inputs(run: StageRun) -> dict:
    """The inputs the report describes, from this asset's upstreams: the base model's manifest, the
    gold's agreement with human raters (prompts from human-rated snippets), a skipped DPO's reason,
    what the learned rewards are worth (held-out accuracy against the gold's ceiling)."""
    from assets.rewards import HELDOUT_FILE
    from assets.synthesis import GOLD_AGREEMENT
    from models.lm.lm import read_manifest

    world: dict = {"base_model": read_manifest(run.path("base_model"))}
    if (agreement := run.path("prompts") / GOLD_AGREEMENT).exists():
        world["gold_agreement"] = json.loads(agreement.read_text())
    if (skipped := run.path("dpo_model") / DPO_SKIPPED).exists():
        world["dpo_skipped"] = json.loads(skipped.read_text())["reason"]
    if (rewards := run.path("reward_models") / HELDOUT_FILE).exists():
        world["reward_models"] = json.loads(rewards.read_text())
    return world


class EvaluationConfig(dg.Config):
    betas: Optional[list[float]] = None
    bon_ns: Optional[list[int]] = None


@pipeline_asset("evaluation", EvaluationConfig, group_name="evaluation", kinds={"pytorch", "parquet"}, pool="gpu",
                description="Base sampling, Best-of-N (N=1..128), VAS beta sweep per parameterization and the "
                            "composition grid on held-out prompts; every sample in data/eval/samples.parquet.")
def evaluation(run: StageRun) -> Produced:
    # torch-backed modules load inside the assets that use them: `dagster dev` loads these definitions without torch
    from models.evaluation.evaluation import EvalConfig, Evaluator, headline_numbers, headline_table, summarize
    from models.lm.lm import load_causal_lm

    device, base, tokenizer, prompts, scorers = load_held_out(run)
    value_models = load_value_models(run.path("value_models"), device=device, base_model=base)
    world = world_inputs(run)
    dpo = None if "dpo_skipped" in world else load_causal_lm(run.path("dpo_model"), device=device)[0]
    if dpo is None:
        run.log.info(f"no DPO row: {world['dpo_skipped']}")
    evaluator = Evaluator(base, tokenizer, value_models, scorers, [a for a in scorers if a in GOLD_REWARDS],
                          prompts, run.config_for(EvalConfig), device=device,
                          progress=run.log.info,
                          dpo_model=dpo)
    runs = evaluator.run_all()
    samples = pd.concat([r.frame for r in runs], ignore_index=True)
    summary = summarize(runs)
    if evaluator.tilt is not None:
        summary = pd.concat([summary, evaluator.tilt], ignore_index=True)
    write_folder(run.path("evaluation"), {"samples.parquet": samples, "summary.parquet": summary,
                                          WORLD_FILE: world})

    rows = []
    for _, row in summary.iterrows():
        method_params = {"method": row.method, **json.loads(row.params)}
        for column, value in row.items():
            if column in ("method", "params", "family", "n_samples") or column.startswith("param_") or pd.isna(value):
                continue
            rows.append(metric_row(column, float(value), split="eval", method=row.method, params=method_params))
    headline = headline_numbers(summary)
    table = summary[[c for c in HEADLINE_COLUMNS if c in summary.columns]]
    run.log.info("evaluation summary:\n" + table.to_string(index=False))
    return Produced(headline, extra_rows=rows,
                    metadata={"headline": dg.MetadataValue.md(headline_table(summary)),
                              "summary": dg.MetadataValue.md(table.to_markdown(index=False, floatfmt=".3f"))})
