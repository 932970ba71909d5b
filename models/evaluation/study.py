"""The seed study: the evaluation summary of several seeds, aggregated into a verdict that holds
across seeds (mean and sample sd), and the VAS-vs-Best-of-N lift ratio per seed.

Pure pandas on per-seed evaluation summaries (models.evaluation.evaluation.summarize, plus a `seed`
column); no Dagster here. `vas study` produces the frames, the report reads the verdict.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

# Per-seed summary columns aggregated across seeds (those present).
STUDY_METRICS = ["gold_positivity_mean", "learned_positivity_mean", "gold_conciseness_mean", "kl_nats_mean",
                 "distinct_2", "repeat_4gram_share", "base_forwards_per_sample", "mean_tokens"]
# A decoding setting counts toward a target only if its text stays like the references': distinct-2
# at least MIN_DISTINCT_FRACTION x that of base sampling, or of Best-of-max-N where Best-of-N itself
# is less diverse (on the embedded world Best-of-128 keeps 0.72x base's: a bar above it would rule
# out the very reference), and the share of samples that repeat a word 4-gram within themselves at
# most MAX_REPEAT_EXCESS above base's. Reward bought by loops that a lexicon scores ("everything
# you wish you did and everything you wish you did") does not count.
MIN_DISTINCT_FRACTION = 0.9
MAX_REPEAT_EXCESS = 0.05
ELIGIBILITY = (f"distinct-2 at least {MIN_DISTINCT_FRACTION:g}x base sampling's (or Best-of-N's, where lower) and "
               f"a share of samples repeating a 4-gram at most {MAX_REPEAT_EXCESS:g} above base's")


def eligible(rows: pd.DataFrame, base: pd.Series, bon: pd.Series | None = None) -> pd.DataFrame:
    """The rows (summary rows of one seed) that keep the references' text (ELIGIBILITY); bon: the
    Best-of-max-N row, when there is one. A summary written before the repeat share existed is
    judged by distinct-2 alone."""
    reference = float(base.distinct_2) if bon is None else min(float(base.distinct_2), float(bon.distinct_2))
    keep = rows.distinct_2 >= MIN_DISTINCT_FRACTION * reference - 1e-12
    if "repeat_4gram_share" in rows and pd.notna(base.get("repeat_4gram_share")):
        keep &= rows.repeat_4gram_share <= float(base.repeat_4gram_share) + MAX_REPEAT_EXCESS + 1e-12
    return rows[keep]


def best_eligible(summary: pd.DataFrame, method: str, max_kl: float | None = None) -> pd.Series | None:
    """The `method` row of one seed's summary with the highest gold positivity among the eligible
    ones (against its base and Best-of-max-N rows) with a KL of at most max_kl nats (None: any), or None."""
    base, bon = summary[summary.method == "base"], summary[summary.method == "bon"]
    if base.empty:
        return None
    rows = eligible(in_budget(summary[summary.method == method], max_kl), base.iloc[0],
                    bon.loc[bon.param_n.idxmax()] if len(bon) else None)
    return None if rows.empty else rows.loc[rows.gold_positivity_mean.idxmax()]


def in_budget(rows: pd.DataFrame, max_kl: float | None) -> pd.DataFrame:
    """The rows with a mean KL of at most max_kl nats (all of them when max_kl is None)."""
    return rows if max_kl is None else rows[rows.kl_nats_mean <= max_kl + 1e-12]


def within(max_kl: float | None) -> str:
    """How a KL budget reads in a sentence ("" without one)."""
    return "" if max_kl is None else f" and a KL of at most {max_kl:g} nats"


def beats(vas: pd.Series, args: pd.Series) -> bool:
    """Whether a VAS row beats an ARGS row: more gold positivity at no more base-model forwards."""
    return bool(vas.gold_positivity_mean > args.gold_positivity_mean
                and vas.base_forwards_per_sample <= args.base_forwards_per_sample)


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval, 1.96 · sd (ddof=1) / sqrt(n); NaN half
    with fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(half)


def _sd(values) -> float:
    """Sample standard deviation (ddof=1); NaN with fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def aggregate(per_seed: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, params): each metric's mean across seeds (same column name) and its
    sample sd (`<metric>_sd`, ddof=1), the param_* columns, and n_seeds."""
    if "seed" not in per_seed:
        raise KeyError("per_seed needs a `seed` column (one evaluation summary per seed, concatenated)")
    metrics = [c for c in STUDY_METRICS if c in per_seed]
    param_columns = [c for c in per_seed.columns if c.startswith("param_")]
    rows = []
    for (method, params), group in per_seed.groupby(["method", "params"], sort=False):
        row = {"method": method, "params": params, "n_seeds": int(group.seed.nunique())}
        row.update({c: group[c].iloc[0] for c in param_columns})
        for column in metrics:
            row[column] = float(group[column].mean())
            row[f"{column}_sd"] = _sd(group[column])
        rows.append(row)
    return pd.DataFrame(rows)


def _one_seed(summary: pd.DataFrame, max_kl: float | None = None) -> dict:
    """Base, Best-of-max-N and the best eligible VAS row (within max_kl nats) of one seed's summary,
    and the lift ratio."""
    base = summary[summary.method == "base"]
    bon = summary[summary.method == "bon"]
    if base.empty or bon.empty:
        raise ValueError("each seed's summary needs a base row and Best-of-N rows")
    base_gold = float(base.gold_positivity_mean.iloc[0])
    ref = bon.loc[bon.param_n.idxmax()]
    vas = summary[summary.method == "vas"]
    kept = eligible(in_budget(vas, max_kl), base.iloc[0], ref)
    # ARGS is not held to the budget: VAS must beat its best row wherever that lies.
    best, top = best_eligible(summary, "vas", max_kl), best_eligible(summary, "args")
    out = {"base_gold": base_gold, "bon_n": int(ref.param_n), "bon_gold": float(ref.gold_positivity_mean),
           "bon_distinct_2": float(ref.distinct_2), "n_vas_rows": len(vas), "n_vas_eligible": len(kept),
           "vas_params": None, "vas_gold": float("nan"), "vas_distinct_2": float("nan"), "vas_kl": float("nan"),
           "ratio": float("nan"), "cost_vs_bon": float("nan")}
    bon_lift = out["bon_gold"] - base_gold

    def share(row) -> float:
        return (float(row.gold_positivity_mean) - base_gold) / bon_lift if bon_lift > 0 else float("nan")

    def cost(row) -> float:
        return float(row.base_forwards_per_sample) / float(ref.base_forwards_per_sample)

    # ARGS, the peer that needs no value training: its best eligible row, and whether VAS beats it
    # (more gold at no more cost).
    if top is not None:
        out.update(args_params=top.params, args_gold=float(top.gold_positivity_mean), args_ratio=share(top),
                   args_cost_vs_bon=cost(top), args_kl=float(top.kl_nats_mean))
    if best is None:
        return out
    out.update(vas_params=best.params, vas_gold=float(best.gold_positivity_mean),
               vas_distinct_2=float(best.distinct_2), vas_kl=float(best.kl_nats_mean),
               ratio=share(best), cost_vs_bon=cost(best))
    if top is not None:
        out["beats_args"] = beats(best, top)
    return out


def lift_ratio(per_seed: pd.DataFrame, max_kl: float | None = None) -> dict:
    """Per seed: (best VAS gold-positivity lift over base) / (Best-of-max-N's lift), where the best
    VAS row is the highest gold positivity among the `eligible` method "vas" rows with a KL of at
    most max_kl nats (the report's verdict_max_kl; None: any); its params, its KL
    and its cost relative to Best-of-max-N
    (base-model forwards per sample). Then mean and sd (ddof=1) of ratio and cost across the seeds
    where a ratio exists (a seed with no eligible VAS row, or no Best-of-N lift, has NaN)."""
    if "seed" not in per_seed:
        raise KeyError("per_seed needs a `seed` column (one evaluation summary per seed, concatenated)")
    seeds = []
    for seed, summary in per_seed.groupby("seed", sort=True):
        seeds.append({"seed": int(seed), **_one_seed(summary, max_kl)})
    ratios = [s["ratio"] for s in seeds if math.isfinite(s["ratio"])]
    costs = [s["cost_vs_bon"] for s in seeds if math.isfinite(s["cost_vs_bon"])]
    kls = [s["vas_kl"] for s in seeds if math.isfinite(s["ratio"])]
    args_ratios = [s["args_ratio"] for s in seeds if math.isfinite(s.get("args_ratio", float("nan")))]
    args_costs = [s["args_cost_vs_bon"] for s in seeds if "args_cost_vs_bon" in s]
    return {
        "per_seed": seeds,
        "n_seeds": len(seeds),
        "n_with_ratio": len(ratios),
        "bon_n": max(s["bon_n"] for s in seeds),
        "eligibility": ELIGIBILITY,
        "max_kl": max_kl,
        "ratio_mean": float(np.mean(ratios)) if ratios else float("nan"),
        "ratio_sd": _sd(ratios),
        "cost_vs_bon_mean": float(np.mean(costs)) if costs else float("nan"),
        "cost_vs_bon_sd": _sd(costs),
        "vas_kl_mean": float(np.mean(kls)) if kls else float("nan"),
        "vas_kl_sd": _sd(kls),
        "n_with_args": sum("args_gold" in s for s in seeds),
        "n_beats_args": sum(bool(s.get("beats_args")) for s in seeds),
        "args_ratio_mean": float(np.mean(args_ratios)) if args_ratios else float("nan"),
        "args_ratio_sd": _sd(args_ratios),
        "args_cost_vs_bon_mean": float(np.mean(args_costs)) if args_costs else float("nan"),
        "args_cost_vs_bon_sd": _sd(args_costs),
    }


def _label(method: str, params: str | None) -> str:
    values = json.loads(params) if params else {}
    shown = ", ".join(f"{k}={v}" for k, v in values.items() if k != "attribute")
    return f"{method} {shown}".strip()


def _pm(mean: float, sd: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" + ("" if not math.isfinite(sd) else f" ± {sd:.{digits}f}")


def args_sentence(ratio: dict) -> str:
    """ARGS across seeds (its lift ratio and cost) and in how many seeds VAS beats it; "" without ARGS rows."""
    if not ratio.get("n_with_args"):
        return ""
    bon = f"Best-of-{ratio['bon_n']}"
    return (f" ARGS (the reward model read at every prefix, no value training), at its best eligible weight: "
            f"{_pm(ratio['args_ratio_mean'], ratio['args_ratio_sd'], 2)} of {bon}'s lift at "
            f"{_pm(ratio['args_cost_vs_bon_mean'], ratio['args_cost_vs_bon_sd'])}x its forwards; VAS beats it "
            f"(more gold at no more cost) in {ratio['n_beats_args']} of {ratio['n_with_args']} seeds.")


def ratio_sentence(ratio: dict) -> str:
    """One sentence: the lift ratio across seeds, what it compares, and what VAS costs; then ARGS."""
    return _vas_sentence(ratio) + args_sentence(ratio)


def _vas_sentence(ratio: dict) -> str:
    n, bon = ratio["n_seeds"], f"Best-of-{ratio['bon_n']}"
    kept = ratio["eligibility"] + within(ratio.get("max_kl"))
    if not ratio["n_with_ratio"]:
        no_lift = sum(s["bon_gold"] <= s["base_gold"] for s in ratio["per_seed"])
        no_vas = sum(s["n_vas_eligible"] == 0 for s in ratio["per_seed"])
        return (f"Across {n} seed(s): no lift ratio ({bon} did not lift gold positivity over base in {no_lift} "
                f"seed(s); no VAS setting kept {kept} in {no_vas}).")
    picks = "; ".join(f"seed {s['seed']}: {s['ratio']:.2f} ({_label('vas', s['vas_params'])})"
                      for s in ratio["per_seed"] if not math.isnan(s["ratio"]))
    no_vas = [str(s["seed"]) for s in ratio["per_seed"] if s["n_vas_eligible"] == 0]
    no_lift = [str(s["seed"]) for s in ratio["per_seed"] if s["n_vas_eligible"] and math.isnan(s["ratio"])]
    missing = "".join(f" No ratio in seed {', '.join(seeds)}: {why}." for seeds, why in (
        (no_lift, f"{bon} did not lift gold positivity over base there"),
        (no_vas, f"no VAS setting kept {kept}")) if seeds)
    return (f"Across {n} seeds: the best VAS setting with {kept} reaches ratio mean ± sd = "
            f"{_pm(ratio['ratio_mean'], ratio['ratio_sd'], 2)} of {bon}'s gold-positivity lift over base, at "
            f"{_pm(ratio['cost_vs_bon_mean'], ratio['cost_vs_bon_sd'])}x its base-model forwards per sample "
            f"and a KL of {_pm(ratio['vas_kl_mean'], ratio['vas_kl_sd'], 2)} nats ({picks})."
            + missing)


def study_markdown(aggregate: pd.DataFrame, ratio: dict) -> str:
    """The study as markdown: the lift-ratio verdict, then mean ± sd across seeds per method."""
    lines = ["# VAS seed study", "", ratio_sentence(ratio), "",
             "Mean ± sd (ddof=1) across seeds of each seed's evaluation summary.", "",
             "| method | seeds | gold positivity | learned positivity | gold conciseness | KL (nats) | distinct-2 "
             "| 4-gram repeat share | base forwards / sample |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(row, column: str, digits: int = 3) -> str:
        if column not in row or pd.isna(row[column]):
            return ""
        return _pm(row[column], row.get(f"{column}_sd", float("nan")), digits)

    for _, row in aggregate.iterrows():
        lines.append(f"| {_label(row.method, row.params)} | {int(row.n_seeds)} | {cell(row, 'gold_positivity_mean')} | "
                     f"{cell(row, 'learned_positivity_mean')} | {cell(row, 'gold_conciseness_mean')} | "
                     f"{cell(row, 'kl_nats_mean', 2)} | {cell(row, 'distinct_2')} | "
                     f"{cell(row, 'repeat_4gram_share')} | {cell(row, 'base_forwards_per_sample', 1)} |")
    lines += ["", "| seed | base gold | Best-of-N gold | best eligible VAS | VAS gold | VAS KL | lift ratio "
              "| cost vs Best-of-N | best eligible ARGS | ARGS lift ratio (cost) | VAS beats ARGS |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in ratio["per_seed"]:
        vas = _label("vas", s["vas_params"]) if s["vas_params"] else "none eligible"
        args = (_label("args", s["args_params"]), f"{s['args_ratio']:.2f} ({s['args_cost_vs_bon']:.3f})",
                "yes" if s.get("beats_args") else "no") if s.get("args_params") else ("-", "-", "-")
        lines.append(f"| {s['seed']} | {s['base_gold']:.3f} | {s['bon_gold']:.3f} (N={s['bon_n']}) | {vas} | "
                     f"{s['vas_gold']:.3f} | {s['vas_kl']:.2f} | {s['ratio']:.2f} | {s['cost_vs_bon']:.3f} | "
                     + " | ".join(args) + " |")
    return "\n".join(lines) + "\n"
