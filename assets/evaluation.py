"""Group `evaluation`: every method on the held-out prompts, same seeds; all samples stored."""

from typing import Optional

import dagster as dg
from dagster_duckdb import DuckDBResource

from assets.common import LogToDagster, finish, lineage_inputs, output_path, reuse, torch_threads
from assets.metrics_db import metric_row
from orchestration.profiles import config_from, resolve
from orchestration.resources import VasSettings

HEADLINE_COLUMNS = ["method", "params", "gold_positivity_mean", "gold_positivity_ci95", "gold_conciseness_mean",
                    "gold_conciseness_ci95", "learned_positivity_mean", "kl_nats_mean", "gold_positivity_winrate",
                    "distinct_2", "mean_tokens", "seconds_per_sample", "base_forwards_per_sample"]


class EvaluationConfig(dg.Config):
    betas: Optional[list[float]] = None
    bon_ns: Optional[list[int]] = None


def load_value_models(root):
    """parameterization -> attribute -> ValueModel, from data/value_models."""
    import json

    from models.value_model import ValueModel

    found: dict[str, dict] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        meta = json.loads((folder / "vas_value.json").read_text())
        found.setdefault(meta["parameterization"], {})[meta["attribute"]] = ValueModel.load(folder).eval()
    return found


@dg.asset(group_name="evaluation", deps=["base_model", "prompts", "reward_models", "value_models", "dpo_model"],
          kinds={"pytorch", "parquet"}, pool="gpu",
          description="Base sampling, Best-of-N (N=1..128), VAS beta sweep per parameterization and the "
                      "composition grid on held-out prompts; every sample in data/eval/samples.parquet.")
def evaluation(context: dg.AssetExecutionContext, config: EvaluationConfig, settings: VasSettings,
               duckdb: DuckDBResource) -> dg.MaterializeResult:
    import json

    import pandas as pd

    from models.artifacts import write_folder
    from models.evaluation import EvalConfig, Evaluator, headline_table, summarize
    from models.lm import load_causal_lm, load_frozen_base, pick_device
    from models.reward_model import load_reward_models
    from models.rewards import GOLD_REWARDS

    torch_threads(settings)
    profile = settings.params()
    params = resolve(profile, "evaluation", config.model_dump())
    upstream = ["base_model", "prompts", "reward_models", "value_models", "dpo_model"]
    inputs = lineage_inputs(settings, upstream)
    if (reused := reuse(context, settings, duckdb, "evaluation", params, inputs)) is not None:
        return reused
    device = str(pick_device(settings.device))
    base, tokenizer, _ = load_frozen_base(output_path(settings, "base_model"), device=device)
    prompts = pd.read_parquet(output_path(settings, "prompts") / "prompts.parquet")
    prompts = prompts[prompts.split == "eval"].reset_index(drop=True)
    scorers = load_reward_models(output_path(settings, "reward_models"), device=device)
    value_models = load_value_models(output_path(settings, "value_models"))
    for by_attribute in value_models.values():
        for model in by_attribute.values():
            model.to(device)
    dpo, _ = load_causal_lm(output_path(settings, "dpo_model"), device=device)
    evaluator = Evaluator(base, tokenizer, value_models, scorers, [a for a in scorers if a in GOLD_REWARDS],
                          prompts, config_from(EvalConfig, params, "evaluation"), device=device, progress=context.log.info,
                          dpo_model=dpo)
    with LogToDagster(context):
        runs = evaluator.run_all()
    samples = pd.concat([r.frame for r in runs], ignore_index=True)
    summary = summarize(runs)
    write_folder(output_path(settings, "evaluation"), {"samples.parquet": samples, "summary.parquet": summary})

    rows = []
    for _, row in summary.iterrows():
        method_params = {"method": row.method, **json.loads(row.params)}
        for column, value in row.items():
            if column in ("method", "params", "family", "n_samples") or column.startswith("param_") or pd.isna(value):
                continue
            rows.append(metric_row(column, float(value), split="eval", method=row.method, params=method_params))
    headline = headline_numbers(summary)
    table = summary[[c for c in HEADLINE_COLUMNS if c in summary.columns]]
    context.log.info("evaluation summary:\n" + table.to_string(index=False))
    return finish(context, settings, duckdb, "evaluation", params, headline,
                  inputs=inputs, extra_rows=rows,
                  metadata={"headline": dg.MetadataValue.md(headline_table(summary)),
                            "summary": dg.MetadataValue.md(table.to_markdown(index=False, floatfmt=".3f"))})


def headline_numbers(summary) -> dict[str, float]:
    """Base vs the best VAS beta vs Best-of-128 on gold positivity, and what each costs."""
    out: dict[str, float] = {}
    base = summary[summary.method == "base"].iloc[0]
    out["base/gold_positivity"] = base.gold_positivity_mean
    out["base/gold_positivity_ci95"] = base.gold_positivity_ci95
    bon = summary[summary.method == "bon"]
    if len(bon):
        top = bon.loc[bon.param_n.idxmax()]
        out[f"bon{int(top.param_n)}/gold_positivity"] = top.gold_positivity_mean
        out[f"bon{int(top.param_n)}/kl_nats"] = top.kl_nats_mean
        out[f"bon{int(top.param_n)}/seconds_per_sample"] = top.seconds_per_sample
    for family, group in summary[summary.method.isin(["vas", "vas_rerank"])].groupby("family"):
        best = group.loc[group.gold_positivity_mean.idxmax()]
        key = family.lower().replace("vas ", "vas_").replace(" + rerank, beta ", "_rerank_b").replace(" ", "_")
        out[f"{key}/best_{'n' if best.method == 'vas_rerank' else 'beta'}"] = \
            best.param_n if best.method == "vas_rerank" else best.param_beta
        out[f"{key}/gold_positivity"] = best.gold_positivity_mean
        out[f"{key}/gold_positivity_ci95"] = best.gold_positivity_ci95
        out[f"{key}/kl_nats"] = best.kl_nats_mean
        out[f"{key}/seconds_per_sample"] = best.seconds_per_sample
    dpo = summary[summary.method == "dpo"]
    if len(dpo):
        out["dpo/gold_positivity"] = dpo.iloc[0].gold_positivity_mean
        out["dpo/kl_nats"] = dpo.iloc[0].kl_nats_mean
    out["base/seconds_per_sample"] = base.seconds_per_sample
    return {k: float(v) for k, v in out.items()}
