"""The evaluation report: reward-vs-KL frontier, composition grid, cost plot, headline verdict.

Plain matplotlib (Agg) on the evaluation summary; no Dagster here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from models.evaluation.evaluation import headline_table
from models.evaluation.study import ELIGIBILITY, beats, best_eligible, in_budget, within


@dataclass
class ReportConfig:
    # The verdicts (this run's, the seed study's, the lift over base, VAS against ARGS) weigh only VAS
    # rows at most this KL from pi0, in nats (None: any). A lift bought with tens of nats is not the
    # product's promise: Best-of-16 spends 1.84 on the real profile.
    verdict_max_kl: float | None = None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _families(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame, str]]:
    """(label, rows sorted along the curve, annotation column) per method family."""
    out = []
    bon = summary[summary.method == "bon"]
    if len(bon):
        out.append(("Best-of-N", bon.sort_values("param_n"), "param_n"))
    for label, group in summary[summary.method == "vas"].groupby("family"):
        out.append((label, group.sort_values("param_beta"), "param_beta"))
    for label, group in summary[summary.method == "vas_rerank"].groupby("family"):
        out.append((label, group.sort_values("param_n"), "param_n"))
    args = summary[summary.method == "args"]
    if len(args):
        out.append(("ARGS (reward model at every prefix)", args.sort_values("param_weight"), "param_weight"))
    return out


def frontier_figure(summary: pd.DataFrame, path: str | Path) -> Path:
    """Gold and learned positivity against KL(pi || pi0), one line per method family."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, reward, title in ((axes[0], "gold_positivity", "gold positivity (VADER)"),
                              (axes[1], "learned_positivity", "learned positivity (reward model)")):
        for label, rows, note in _families(summary):
            ax.errorbar(rows.kl_nats_mean, rows[f"{reward}_mean"], yerr=rows[f"{reward}_ci95"], marker="o",
                        capsize=3, label=label)
            for _, r in rows.iterrows():
                ax.annotate(f"{r[note]:g}", (r.kl_nats_mean, r[f"{reward}_mean"]), textcoords="offset points",
                            xytext=(3, 4), fontsize=7)
        tilt = summary[summary.method == "tilt"].sort_values("kl_nats_mean")
        if len(tilt):
            ax.plot(tilt.kl_nats_mean, tilt[f"{reward}_mean"], linestyle="--", color="black", alpha=0.6,
                    label="exact tilt (estimate on Best-of-N's pool)")
        for method, marker in (("base", "s"), ("dpo", "D")):
            rows = summary[summary.method == method]
            if len(rows):
                ax.errorbar(rows.kl_nats_mean, rows[f"{reward}_mean"], yerr=rows[f"{reward}_ci95"], marker=marker,
                            linestyle="none", capsize=3, markersize=8, label=method.upper() if method == "dpo" else method)
        ax.set_xlabel("KL(pi || pi0), nats")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    # The frontier is read where Best-of-N lives; far-off high-beta points would squash it.
    bon = summary[summary.method == "bon"]
    limit = 2 * float(bon.kl_nats_mean.max()) if len(bon) and bon.kl_nats_mean.max() > 0 else None
    hidden = int((summary.kl_nats_mean > limit).sum()) if limit else 0
    for ax in axes if limit else ():
        ax.set_xlim(-0.1, limit)
    axes[0].set_title("Reward vs KL (labels: N for Best-of-N and rerank, beta for VAS; bars: 95% CI)"
                      + (f"\n{hidden} point(s) beyond {limit:.1f} nats not shown" if hidden else ""), fontsize=10)
    axes[1].legend(loc="lower right", fontsize=8)
    return _save(plt, fig, path)


def composition_figure(summary: pd.DataFrame, path: str | Path) -> Path:
    """Heatmaps of gold positivity and gold conciseness over the weight grid."""
    plt = _plt()
    rows = summary[summary.method == "compose"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    if rows.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no composition grid in this evaluation", ha="center", va="center")
            ax.set_axis_off()
    else:
        weights = pd.DataFrame([json.loads(p)["weights"] for p in rows.params], index=rows.index)
        grid = rows.assign(w_pos=weights.positivity, w_con=weights.conciseness)
        for ax, reward in zip(axes, ("gold_positivity_mean", "gold_conciseness_mean")):
            table = grid.pivot_table(index="w_pos", columns="w_con", values=reward)
            image = ax.imshow(table.to_numpy(), origin="lower", cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(table.columns)), [f"{c:g}" for c in table.columns])
            ax.set_yticks(range(len(table.index)), [f"{i:g}" for i in table.index])
            ax.set_xlabel("conciseness weight")
            ax.set_ylabel("positivity weight")
            ax.set_title(reward.removesuffix("_mean").replace("_", " "))
            for (i, j), value in pd.DataFrame(table.to_numpy()).stack().items():
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white", fontsize=9)
            fig.colorbar(image, ax=ax)
    fig.suptitle("Deploy-time composition: VAS with per-request weights")
    return _save(plt, fig, path)


def cost_figure(summary: pd.DataFrame, path: str | Path) -> Path:
    """Gold positivity against decode seconds per sample (log scale)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, rows, _ in _families(summary):
        ax.plot(rows.seconds_per_sample, rows.gold_positivity_mean, marker="o", label=label)
    for method, marker in (("base", "s"), ("dpo", "D")):
        rows = summary[summary.method == method]
        if len(rows):
            ax.plot(rows.seconds_per_sample, rows.gold_positivity_mean, marker=marker, linestyle="none",
                    markersize=8, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("decode wall seconds per sample (log)")
    ax.set_ylabel("gold positivity")
    ax.set_title("What the reward costs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def verdict(summary: pd.DataFrame, max_kl: float | None = None) -> str:
    """Does the best eligible VAS setting (models.evaluation.study.eligible: text like base sampling's) with
    a KL of at most max_kl nats reach Best-of-max-N's gold positivity (95% intervals overlap), and at
    what share of its decode time?"""
    bon = summary[summary.method == "bon"]
    vas = summary[summary.method == "vas"]
    if bon.empty or vas.empty:
        return "No Best-of-N or VAS rows: nothing to compare."
    ref = bon.loc[bon.param_n.idxmax()]
    # A setting that buys reward with loops or by collapsing diversity does not count (as in the targets).
    best = best_eligible(summary, "vas", max_kl)
    if best is None:
        return f"No VAS setting keeps {ELIGIBILITY}{within(max_kl)}: nothing to compare."
    reaches = best.gold_positivity_mean + best.gold_positivity_ci95 >= ref.gold_positivity_mean - ref.gold_positivity_ci95
    ratio = best.seconds_per_sample / ref.seconds_per_sample
    what = "reaches" if reaches else "falls short of"
    name = best.family if "family" in best else f"VAS {best.param_parameterization}"
    base = summary[summary.method == "base"].iloc[0]
    lift = ref.gold_positivity_mean - base.gold_positivity_mean
    share = f"{(best.gold_positivity_mean - base.gold_positivity_mean) / lift:.2f}" if lift > 0 else "no share (no lift)"
    forwards = ""
    if "base_forwards_per_sample" in best:
        forwards = f" and {best.base_forwards_per_sample / ref.base_forwards_per_sample:.3f}x its base-model forwards"
    budget = "" if max_kl is None else f"Within {max_kl:g} nats of KL: "
    return (f"{budget}{name} (beta={best.param_beta:g}) {what} Best-of-{int(ref.param_n)}'s "
            f"gold positivity ({best.gold_positivity_mean:.3f} ± {best.gold_positivity_ci95:.3f} vs "
            f"{ref.gold_positivity_mean:.3f} ± {ref.gold_positivity_ci95:.3f}): {share} of its lift over base, at "
            f"{best.kl_nats_mean:.2f} nats, {ratio:.3f}x its decode time per sample{forwards}.")


def args_comparison(summary: pd.DataFrame, max_kl: float | None = None) -> str:
    """The best eligible VAS row (within max_kl nats) against the best eligible ARGS row (the peer that
    needs no value training, wherever its KL lies): gold positivity, KL and base-model forwards of
    each, and whether VAS beats it (more gold at no more forwards). "" without ARGS rows."""
    if not (summary.method == "args").any():
        return ""
    a, v = best_eligible(summary, "args"), best_eligible(summary, "vas", max_kl)
    if a is None:
        return f"No ARGS row keeps {ELIGIBILITY}."
    text = (f"ARGS (weight {a.param_weight:g}): {a.gold_positivity_mean:.3f} ± {a.gold_positivity_ci95:.3f} gold "
            f"positivity at {a.kl_nats_mean:.2f} nats and {a.base_forwards_per_sample:.0f} base-model forwards per sample")
    if v is None:
        return text + f"; no VAS row keeps {ELIGIBILITY}{within(max_kl)}."
    return (text + f"; the best eligible VAS row ({v.family}, beta {v.param_beta:g}) {v.gold_positivity_mean:.3f} ± "
            f"{v.gold_positivity_ci95:.3f} at {v.kl_nats_mean:.2f} nats and {v.base_forwards_per_sample:.0f} forwards: "
            + ("VAS beats ARGS at no more cost." if beats(v, a) else "VAS does not beat ARGS at equal or lower cost."))


def report_verdict(summary: pd.DataFrame, study_dir: str | Path | None = None, max_kl: float | None = None) -> str:
    """The report's verdict: across seeds from the seed study (`vas study`) when study_dir holds
    its aggregate, else this run's verdict, said to be a single run (one seed); VAS rows within
    max_kl nats (ReportConfig.verdict_max_kl)."""
    study_dir = Path(study_dir) if study_dir is not None else None
    if study_dir is not None and (study_dir / "aggregate.parquet").exists() and (study_dir / "study.parquet").exists():
        from models.evaluation.study import lift_ratio, ratio_sentence

        ratio = lift_ratio(pd.read_parquet(study_dir / "study.parquet"), max_kl)
        return (f"From the seed study ({study_dir}, seeds {', '.join(str(s['seed']) for s in ratio['per_seed'])}): "
                f"{ratio_sentence(ratio)} This run alone: {verdict(summary, max_kl)}")
    return f"Single run (one seed): {verdict(summary, max_kl)} `make study` gives a verdict across seeds."


def value_error_section(value_error: pd.DataFrame | None) -> str:
    """The value-error table (models.evaluation.value_error metrics) as a report section; "" without one."""
    if value_error is None or value_error.empty:
        return ""
    from models.evaluation.value_error import markdown_table

    return ("\n## Value error against Monte-Carlo estimates\n\n"
            "Each value model's Q(s, a) at prefixes of held-out pi0 completions, for pi0's top candidate "
            "tokens, against the mean (and soft value at beta) of pi0 continuations' standardized learned "
            "reward; target `calibrated` (models with calibrated bins): the mean of their normal scores through "
            "the model's calibration map, what the calibrated decoder steers by. `mc_noise_mse` is the floor an "
            "exact model would show (MC standard error squared), "
            "`target_var` the mse of the best constant guess; `spearman` is the mean over states of the "
            "rank correlation across candidates, and `spearman_ceiling` the one an exact model would get "
            "against the same noisy MC targets (estimated from their spread and standard errors).\n\n"
            + markdown_table(value_error) + "\n")


def targets_section(summary: pd.DataFrame, per_seed: pd.DataFrame | None = None,
                    value_error: pd.DataFrame | None = None) -> str:
    """The product's targets (models/evaluation/targets.py) on this run and, from a seed study, per seed."""
    from models.evaluation import targets

    if not (summary.method == "bon").any():
        return ""
    text = "\n" + targets.markdown(targets.check(summary), "Targets (this run)", value_error)
    if per_seed is not None:
        text += "\n" + targets.study_markdown(per_seed)
    return text


def lift_over_base(summary: pd.DataFrame, max_kl: float | None = None) -> str:
    """The best eligible VAS row's gold positivity (models.evaluation.study.ELIGIBILITY: loops do not count;
    within max_kl nats) against base sampling's, and whether their 95% intervals are apart: is the
    lift more than this run's noise?"""
    base, best = summary[summary.method == "base"], best_eligible(summary, "vas", max_kl)
    if base.empty or best is None:
        return ""
    base = base.iloc[0]
    apart = best.gold_positivity_mean - best.gold_positivity_ci95 > base.gold_positivity_mean + base.gold_positivity_ci95
    name = best.family if "family" in best else f"VAS {best.param_parameterization}"
    return (f"Lift over base sampling: {name} (beta={best.param_beta:g}) {best.gold_positivity_mean:.3f} ± "
            f"{best.gold_positivity_ci95:.3f} gold positivity at {best.kl_nats_mean:.2f} nats, base "
            f"{base.gold_positivity_mean:.3f} ± {base.gold_positivity_ci95:.3f}: the 95% intervals are "
            f"{'apart' if apart else 'not apart'}.")


def lift_across_seeds(per_seed: pd.DataFrame | None, max_kl: float | None = None) -> str:
    """The same question across a seed study's seeds: the VAS setting with the best mean gold
    positivity (among those with a mean KL of at most max_kl nats), its mean ± sd against base
    sampling's, and in how many seeds the two 95% intervals are apart. One seed's apart intervals
    can be luck; this says how often they are."""
    if per_seed is None or per_seed.empty:
        return ""
    from models.evaluation.study import _label, _pm, _sd, eligible

    base, vas = per_seed[per_seed.method == "base"], per_seed[per_seed.method == "vas"]
    # Only settings eligible in every seed (models.evaluation.study.ELIGIBILITY): a loop's lift does not count.
    for _, seed in per_seed.groupby("seed"):
        seed_base, bon = seed[seed.method == "base"], seed[seed.method == "bon"]
        if len(seed_base):
            kept = eligible(seed[seed.method == "vas"], seed_base.iloc[0],
                            bon.loc[bon.param_n.idxmax()] if len(bon) else None)
            vas = vas[vas.params.isin(set(kept.params))]
    vas = vas[vas.params.isin(set(in_budget(vas.groupby("params", as_index=False).kl_nats_mean.mean(), max_kl).params))]
    if base.empty or vas.empty:
        return ""
    best = vas.groupby("params").gold_positivity_mean.mean().idxmax()
    rows, base = vas[vas.params == best].set_index("seed"), base.set_index("seed")
    seeds = sorted(set(rows.index) & set(base.index))
    if not seeds:
        return ""
    rows, base = rows.loc[seeds], base.loc[seeds]
    apart = int(((rows.gold_positivity_mean - rows.gold_positivity_ci95)
                 > (base.gold_positivity_mean + base.gold_positivity_ci95)).sum())
    vas_gold, base_gold = rows.gold_positivity_mean, base.gold_positivity_mean
    return (f"Across {len(seeds)} seeds ({', '.join(str(s) for s in seeds)}): {_label('vas', best)} "
            f"{_pm(vas_gold.mean(), _sd(vas_gold))} gold positivity (mean ± sd) at {rows.kl_nats_mean.mean():.2f} "
            f"nats, base {_pm(base_gold.mean(), _sd(base_gold))}; the 95% intervals are apart in {apart} of "
            f"{len(seeds)} seeds.")


SERVING_ROWS = {   # bench/serve.py's one-at-a-time rows, in the order and words the report shows them
    "base_c1": "base sampling",
    "vas_c1": "VAS, white-box",
    "vas_c1_top20": "VAS, white-box, top-20 candidates",
    "blackbox_vas_c1": "black-box VAS, `vas serve` as the upstream (top-20 logprobs over HTTP)",
    "blackbox_llamacpp_vas_c1": "black-box VAS, llama.cpp serving the base's GGUF as the upstream",
}


def serving_section(serving: dict | None) -> str:
    """Serving throughput from bench/serve.py (data/bench/serve.json): one request at a time, tokens
    per second side by side in one run, each against base sampling's; then the load test, the
    same requests 1, 4, 16, 64 in flight. "" without a measurement."""
    if not serving or "base_c1" not in serving.get("rows", {}):
        return ""
    rows, base = serving["rows"], serving["rows"]["base_c1"]["tokens_per_s"]
    settings = serving.get("settings", {})
    when = " ".join(part for part in (serving.get("measured_at"),
                                      f"at commit {serving['git_sha'][:7]}" if serving.get("git_sha") else "") if part)
    lines = ["\n## Serving (bench/serve.py)\n",
             f"{settings.get('requests', '?')} held-out prompts, {settings.get('max_tokens', '?')} new tokens each, "
             f"one request at a time, VAS at beta {settings.get('beta', '?')} on positivity"
             + (f"; measured {when}" if when else "") + ".\n",
             "| row | tokens/s | vs base | upstream requests per token |", "|---|---|---|---|"]
    for key, label in SERVING_ROWS.items():
        if key in rows:
            row = rows[key]
            lines.append(f"| {label} | {row['tokens_per_s']:.1f} | x{row['tokens_per_s'] / base:.2f} | "
                         f"{row.get('upstream_requests_per_token', 0):.2f} |")
    levels = sorted({int(key.rsplit("_c", 1)[1]) for key in rows if key.startswith(("base_c", "vas_c"))
                     and key.rsplit("_c", 1)[1].isdigit()})
    if len(levels) > 1 and all("latency_p50_s" in rows.get(f"{name}_c{c}", {}) for name in ("base", "vas")
                               for c in levels):
        lines += [f"\nThe load test: streamed requests, that many in flight at a time (max(prompts, "
                  f"{settings.get('rounds', '?')} x in flight) requests per level); every answer equals the same "
                  "request's at the other levels.\n",
                  "| in flight | base tokens/s | vs 1 | VAS tokens/s | vs 1 | base TTFT p50 | base latency p50 / p99 "
                  "| VAS latency p50 / p99 |", "|---|---|---|---|---|---|---|---|"]
        first = {name: rows[f"{name}_c{levels[0]}"]["tokens_per_s"] for name in ("base", "vas")}
        for c in levels:
            b, v = rows[f"base_c{c}"], rows[f"vas_c{c}"]
            lines.append(f"| {c} | {b['tokens_per_s']:.0f} | x{b['tokens_per_s'] / first['base']:.2f} | "
                         f"{v['tokens_per_s']:.0f} | x{v['tokens_per_s'] / first['vas']:.2f} | "
                         f"{b['ttft_p50_s'] * 1000:.0f} ms | {b['latency_p50_s'] * 1000:.0f} / "
                         f"{b['latency_p99_s'] * 1000:.0f} ms | {v['latency_p50_s'] * 1000:.0f} / "
                         f"{v['latency_p99_s'] * 1000:.0f} ms |")
    return "\n".join(lines) + "\n"


def world_section(world: dict | None) -> str:
    """What this run is about: the base model, where the prompts came from and what the gold is
    worth against human raters (when they are not the embedded world's), a skipped baseline, and
    what the learned rewards are worth against the gold."""
    if not world:
        return ""
    lines = ["\n## The world\n"]
    if (base := world.get("base_model")) and not base.get("embedded", True):
        origin = f", converted from {Path(base['gguf']).name}" if base.get("gguf") else ""
        lines.append(f"- Base model: {base['source']}{origin} (weights sha256 {base['weights_sha256'][:12]}).")
    if agreement := world.get("gold_agreement"):
        per = ", ".join(f"{k.removeprefix('spearman_')} {v:.3f}" for k, v in agreement.items()
                        if k.startswith("spearman_"))
        lines.append(f"- Prompts: openings of human-rated review snippets. The gold positivity scorer (VADER) "
                     f"against the human ratings of {int(agreement['n'])} held-out snippets: Spearman "
                     f"{agreement['spearman']:.3f} ({per}).")
    if skipped := world.get("dpo_skipped"):
        lines.append(f"- DPO baseline skipped: {skipped}.")
    if rewards := world.get("reward_models"):
        lines.append("- Learned rewards (Bradley-Terry, from the pairs only), ranking held-out pairs of the base "
                     "model's completions: " + "; ".join(_reward_worth(a, r) for a, r in sorted(rewards.items()))
                     + ".")
    return "\n".join(lines) + "\n" if len(lines) > 1 else ""


def _reward_worth(attribute: str, reward: dict) -> str:
    """One reward's held-out accuracy, the gold's own ceiling on those labels, and what it learned from."""
    text = f"{attribute} {reward['heldout_accuracy']:.3f}"
    if "gold_ceiling_accuracy" in reward:
        text += f" (the gold itself: {reward['gold_ceiling_accuracy']:.3f})"
    origins = reward.get("pairs_by_origin", {})
    if len(origins) > 1:
        names = {"human_snippets": "human-continuation"}
        text += ", from " + " and ".join(f"{n:,} {names.get(origin, origin)}" for origin, n in sorted(origins.items())) \
            + " pairs"
    return text


def write_report(summary: pd.DataFrame, directory: str | Path, verdict_text: str | None = None,
                 value_error: pd.DataFrame | None = None, per_seed: pd.DataFrame | None = None,
                 world: dict | None = None, serving: dict | None = None,
                 max_kl: float | None = None) -> dict[str, Path]:
    directory = Path(directory)
    paths = {
        "frontier": frontier_figure(summary, directory / "frontier.png"),
        "composition": composition_figure(summary, directory / "composition.png"),
        "cost": cost_figure(summary, directory / "cost.png"),
    }
    lift = " ".join(t for t in (lift_over_base(summary, max_kl), lift_across_seeds(per_seed, max_kl),
                                args_comparison(summary, max_kl)) if t)
    text = (f"# VAS evaluation\n\n{verdict_text or verdict(summary, max_kl)}\n\n" + (f"{lift}\n\n" if lift else "")
            + f"{headline_table(summary)}\n" + world_section(world) + serving_section(serving))
    text += targets_section(summary, per_seed, value_error)
    text += value_error_section(value_error)
    (directory / "report.md").write_text(text, encoding="utf-8")
    paths["report"] = directory / "report.md"
    return paths
