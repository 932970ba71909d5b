"""The product's three targets, checked on an evaluation summary (one seed) or on every seed of a study.

1. frontier: at KL 1, 2 and 4 nats, the learned-reward curve of the best soft-VAS decoder (plain,
   along beta; or + rerank, along N, starting from plain VAS at its beta) lies on or above
   Best-of-N's, both interpolated linearly in KL, within the 95% intervals (beyond Best-of-max-N's
   KL its last point stands in; a decoder whose curve does not reach the KL misses it);
2. lift: the best VAS row without reranking reaches >= 0.95 of Best-of-max-N's gold-positivity lift
   over base, at <= 1/16 of its base-model forwards per sample;
3. rerank: VAS + rerank reaches Best-of-max-N's lift (95% intervals overlap) at <= 1/8 of its cost.

A row that is not `models.evaluation.study.eligible` (its distinct-2 below 0.9x base sampling's, or Best-of-N's
where lower, or its share of samples repeating a 4-gram more than 0.05 above base's) does not
count, whatever its reward.
Pure pandas; the report and the seed study print what these return.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from models.evaluation.study import ELIGIBILITY, eligible

KL_POINTS = (1.0, 2.0, 4.0)
LIFT_SHARE, LIFT_COST = 0.95, 1 / 16
RERANK_COST = 1 / 8


def interpolate(kl: np.ndarray, values: np.ndarray, at: float) -> float:
    """Piecewise-linear value of a curve at KL `at`; NaN outside the KL range it covers."""
    order = np.argsort(kl)
    kl, values = np.asarray(kl, dtype=float)[order], np.asarray(values, dtype=float)[order]
    if len(kl) == 0 or at < kl[0] or at > kl[-1]:
        return float("nan")
    return float(np.interp(at, kl, values))


def _soft_curves(summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Soft-VAS decoders as curves: each plain soft family along beta, and each rerank family along
    N with the plain VAS row at its beta as N = 1."""
    curves = {}
    vas = summary[summary.method == "vas"]
    soft = vas[vas.params.map(lambda p: json.loads(p).get("soft") is True)]
    for family, rows in soft.groupby("family"):
        curves[family] = rows
    for family, rows in summary[summary.method == "vas_rerank"].groupby("family"):
        params = {k: v for k, v in json.loads(rows.params.iloc[0]).items() if k != "n"}
        first = vas[vas.params == json.dumps(params, sort_keys=True)]
        curves[family] = pd.concat([first, rows])
    return curves


def check(summary: pd.DataFrame) -> dict:
    """The three targets on one evaluation summary (models.evaluation.evaluation.summarize)."""
    base = summary[summary.method == "base"].iloc[0]
    bon = summary[summary.method == "bon"].sort_values("param_n")
    if bon.empty:
        raise ValueError("the summary has no Best-of-N rows: nothing to compare against")
    ref = bon.iloc[-1]
    bon_lift = float(ref.gold_positivity_mean - base.gold_positivity_mean)
    tilt = summary[summary.method == "tilt"]

    frontier = []
    for at in KL_POINTS:
        # Beyond Best-of-max-N's KL, its last point stands in (a larger N would only score higher).
        bon_at = min(at, float(bon.kl_nats_mean.max()))
        point = {"kl": at, "bon": interpolate(bon.kl_nats_mean, bon.learned_positivity_mean, bon_at),
                 "bon_ci": interpolate(bon.kl_nats_mean, bon.learned_positivity_ci95, bon_at),
                 "vas": float("nan"), "vas_ci": float("nan"), "decoder": None,
                 # What exact values would reach (models/evaluation/tilt.py): the room the value estimate has.
                 "tilt": interpolate(tilt.kl_nats_mean, tilt.learned_positivity_mean, at)}
        for family, rows in _soft_curves(summary).items():
            rows = eligible(rows, base, ref)
            value = interpolate(rows.kl_nats_mean, rows.learned_positivity_mean, at)
            if math.isfinite(value) and not value <= point["vas"]:
                point.update(vas=value, vas_ci=interpolate(rows.kl_nats_mean, rows.learned_positivity_ci95, at),
                             decoder=family)
        point["met"] = bool(point["vas"] + point["vas_ci"] >= point["bon"] - point["bon_ci"])
        frontier.append(point)

    def best(rows: pd.DataFrame, max_cost: float) -> dict:
        rows = eligible(rows, base, ref)
        rows = rows[rows.base_forwards_per_sample <= max_cost * ref.base_forwards_per_sample]
        if rows.empty:
            return {"row": None, "share": float("nan"), "cost": float("nan"), "overlaps": False}
        top = rows.loc[rows.gold_positivity_mean.idxmax()]
        return {"row": f"{top.family} {top.params}", "gold": float(top.gold_positivity_mean),
                "share": float(top.gold_positivity_mean - base.gold_positivity_mean) / bon_lift
                if bon_lift > 0 else float("nan"),
                "cost": float(top.base_forwards_per_sample / ref.base_forwards_per_sample),
                "overlaps": bool(top.gold_positivity_mean + top.gold_positivity_ci95
                                 >= ref.gold_positivity_mean - ref.gold_positivity_ci95)}

    lift = best(summary[summary.method == "vas"], LIFT_COST)
    lift_any_cost = best(summary[summary.method == "vas"], math.inf)
    rerank = best(summary[summary.method == "vas_rerank"], RERANK_COST)
    return {
        "bon_n": int(ref.param_n), "bon_gold": float(ref.gold_positivity_mean), "base_gold": float(base.gold_positivity_mean),
        "frontier": frontier, "frontier_met": all(p["met"] for p in frontier),
        "lift": lift, "lift_any_cost": lift_any_cost, "lift_met": lift["share"] >= LIFT_SHARE,
        "rerank": rerank, "rerank_met": rerank["overlaps"] or rerank["share"] >= 1.0,
    }


def _yes(flag: bool) -> str:
    return "**met**" if flag else "**missed**"


def why(value_error: pd.DataFrame | None) -> str:
    """The value estimate's error against Monte-Carlo estimates (models/evaluation/value_error.py), per
    positivity value model: what a missed target comes down to."""
    if value_error is None or value_error.empty:
        return ""
    rows = value_error[value_error.attribute == "positivity"]
    parts = [f"{r.model} {r.target}: MSE {r.mse:.3f} (MC noise floor {r.mc_noise_mse:.3f}, a constant guess "
             f"{r.target_var:.3f}), Spearman over pi0's top candidates {r.spearman:.2f}"
             + (f" (an exact model: {r.spearman_ceiling:.2f})" if pd.notna(getattr(r, "spearman_ceiling", None)) else "")
             for r in rows.itertuples()]
    return ("Why targets are missed: the value models rank pi0's top candidates at held-out states only "
            "weakly against Monte-Carlo estimates of the same values: " + "; ".join(parts) + ".\n")


def markdown(result: dict, heading: str = "Targets", value_error: pd.DataFrame | None = None) -> str:
    """The checks as a short markdown section (and why, when one is missed and value errors are given)."""
    n = result["bon_n"]
    lines = [f"## {heading}", "", f"1. Soft VAS on or above Best-of-N's learned-reward curve at KL "
             f"{', '.join(f'{p:g}' for p in KL_POINTS)} (interpolated, 95% intervals): {_yes(result['frontier_met'])}.", ""]
    lines += ["   | KL | Best-of-N | exact tilt (estimate) | best soft-VAS decoder | decoder | on or above |",
              "   |---|---|---|---|---|---|"]
    for p in result["frontier"]:
        vas = "out of its KL range" if not math.isfinite(p["vas"]) else f"{p['vas']:.3f} ± {p['vas_ci']:.3f}"
        tilt = f"{p['tilt']:.3f}" if math.isfinite(p.get("tilt", float("nan"))) else "-"
        lines.append(f"   | {p['kl']:g} | {p['bon']:.3f} ± {p['bon_ci']:.3f} | {tilt} | {vas} | {p['decoder'] or '-'} | "
                     f"{'yes' if p['met'] else 'no'} |")
    room = [f"{p['tilt'] - p['bon']:+.3f} at {p['kl']:g}" for p in result["frontier"]
            if math.isfinite(p.get("tilt", float("nan"))) and math.isfinite(p["bon"])]
    lines += ["", "   Exact tilt: pi0·exp(beta·R)/Z estimated on Best-of-N's pool (models/evaluation/tilt.py), what soft VAS "
              "with exact values would reach: no decoder can lie above it"
              + (f"; its room above Best-of-N (learned reward, by KL): {', '.join(room)}" if room else "") + ".", ""]
    lift, anyc, rr = result["lift"], result["lift_any_cost"], result["rerank"]
    lines += ["", f"2. VAS without reranking reaches >= {LIFT_SHARE:g} of Best-of-{n}'s gold lift at <= 1/16 of its "
              f"forwards: {_yes(result['lift_met'])}: best within that cost: "
              + (f"{lift['share']:.2f} of the lift at {lift['cost']:.3f}x ({lift['row']})" if lift["row"] else "none")
              + (f"; at any cost: {anyc['share']:.2f} at {anyc['cost']:.3f}x ({anyc['row']})" if anyc["row"] else "") + ".",
              f"3. VAS + rerank reaches Best-of-{n}'s lift at <= 1/8 of its cost: {_yes(result['rerank_met'])}: "
              + (f"{rr['share']:.2f} of the lift (gold {rr['gold']:.3f} vs {result['bon_gold']:.3f}) at {rr['cost']:.3f}x "
                 f"({rr['row']})" if rr["row"] else "no rerank row within that cost") + ".",
              "", f"Only rows with {ELIGIBILITY} count.", ""]
    missed = not (result["frontier_met"] and result["lift_met"] and result["rerank_met"])
    return "\n".join(lines) + ("\n" + why(value_error) if missed else "")


def study_markdown(per_seed: pd.DataFrame) -> str:
    """Each target per seed, and how many seeds meet it."""
    results = {int(seed): check(summary) for seed, summary in per_seed.groupby("seed", sort=True)}
    lines = ["## Targets across seeds", "", "| seed | frontier (KL 1 / 2 / 4) | exact tilt's room above Best-of-N "
             "(KL 1 / 2 / 4) | lift share (cost) | rerank share (cost) |", "|---|---|---|---|---|"]
    for seed, r in results.items():
        marks = " / ".join("yes" if p["met"] else "no" for p in r["frontier"])
        room = " / ".join(f"{p['tilt'] - p['bon']:+.3f}" if math.isfinite(p["tilt"] - p["bon"]) else "-"
                          for p in r["frontier"])
        lines.append(f"| {seed} | {marks} | {room} | {r['lift']['share']:.2f} ({r['lift']['cost']:.3f}x) | "
                     f"{r['rerank']['share']:.2f} ({r['rerank']['cost']:.3f}x) |")
    n = len(results)
    for name, key in (("frontier", "frontier_met"), ("lift", "lift_met"), ("rerank", "rerank_met")):
        lines.append(f"\n{name}: met in {sum(r[key] for r in results.values())} of {n} seeds.")
    return "\n".join(lines) + "\n"
