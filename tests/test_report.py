import json

import pandas as pd

from models.evaluation.evaluation import family_of
from models.evaluation.report import composition_figure, lift_across_seeds, lift_over_base, verdict, write_report
from models.evaluation.study import ELIGIBILITY


def summary(vas_gold: float, vas_ci: float, with_compose: bool = True) -> pd.DataFrame:
    def row(method, params, gold, ci, kl, seconds, **extra):
        return {"method": method, "params": json.dumps(params, sort_keys=True), "family": family_of(method, params),
                "gold_positivity_mean": gold,
                "gold_positivity_ci95": ci, "learned_positivity_mean": gold, "learned_positivity_ci95": ci,
                "gold_conciseness_mean": 0.7, "gold_conciseness_ci95": 0.02, "kl_nats_mean": kl,
                "gold_positivity_winrate": 0.6, "distinct_2": 0.3, "seconds_per_sample": seconds,
                "base_forwards_per_sample": seconds * 1000, **extra}

    rows = [row("base", {}, 0.1, 0.05, 0.0, 0.01)]
    rows += [row("bon", {"n": n}, 0.1 + 0.1 * i, 0.04, 0.5 * i, 0.01 * n, param_n=n)
             for i, n in enumerate([1, 16, 128])]
    rows += [row("vas", {"beta": b, "parameterization": "scalar"}, vas_gold - 0.1 / b, vas_ci, b, 0.02,
                 param_beta=b, param_parameterization="scalar") for b in (1.0, 4.0)]
    rows.append(row("dpo", {}, 0.2, 0.05, 1.0, 0.015))
    if with_compose:
        rows += [row("compose", {"weights": {"positivity": p, "conciseness": c}}, 0.1 + p / 10, 0.05, p + c, 0.02)
                 for p in (0.0, 2.0) for c in (0.0, 2.0)]
    return pd.DataFrame(rows)


def test_report_files_and_table(tmp_path):
    paths = write_report(summary(0.3, 0.05), tmp_path)
    for name in ("frontier", "composition", "cost"):
        data = paths[name].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    text = paths["report"].read_text()
    assert "## Targets (this run)" in text and "Best-of-128" in text
    assert "| base |" in text and "| bon n=128 |" in text and "| dpo |" in text
    # VAS cost relative to Best-of-128: 0.02 / 1.28
    assert f"{0.02 / 1.28:.3f}" in text


def test_verdict_is_computed_from_the_intervals():
    # Best-of-128: 0.3 ± 0.04. VAS best (beta 4): gold - 0.025.
    assert "falls short of Best-of-128" in verdict(summary(0.2, 0.02))
    assert "reaches Best-of-128" in verdict(summary(0.3, 0.05))
    assert "0.016x" in verdict(summary(0.3, 0.05))
    # The best VAS row (beta 4: 0.3 - 0.025 = 0.275) holds (0.275 - 0.1) / (0.3 - 0.1) = 0.875 of
    # Best-of-128's lift, at 4 nats and 20 / 1280 of its forwards.
    text = verdict(summary(0.3, 0.05))
    assert "0.87 of its lift over base, at 4.00 nats" in text and "0.016x its base-model forwards" in text


def test_verdict_weighs_only_rows_within_the_kl_budget():
    # VAS beta 4 (0.275 gold) spends 4 nats, beta 1 (0.2 gold) 1 nat: a 2.5-nat budget leaves beta 1,
    # (0.2 - 0.1) / (0.3 - 0.1) = 0.5 of Best-of-128's lift.
    table = summary(0.3, 0.05)
    text = verdict(table, max_kl=2.5)
    assert text.startswith("Within 2.5 nats of KL: ") and "(beta=1)" in text
    assert "0.50 of its lift over base, at 1.00 nats" in text
    assert verdict(table, max_kl=4.0) == "Within 4 nats of KL: " + verdict(table)     # on the edge: kept
    assert verdict(table, max_kl=0.5) == ("No VAS setting keeps " + ELIGIBILITY + " and a KL of at most 0.5 nats: "
                                         "nothing to compare.")
    assert "(beta=1) 0.200" in lift_over_base(table, max_kl=2.5)
    assert lift_over_base(table, max_kl=0.5) == ""


def test_verdict_ignores_settings_that_collapse_diversity():
    table = summary(0.3, 0.05)
    collapsed = (table.method == "vas") & (table.param_beta == 4.0)
    table.loc[collapsed, "distinct_2"] = 0.2                 # below 0.9 x base sampling's 0.3
    text = verdict(table)
    assert "(beta=1)" in text and "falls short of Best-of-128" in text
    table.loc[table.method == "vas", "distinct_2"] = 0.1
    assert "nothing to compare" in verdict(table)


def test_composition_figure_without_a_grid_says_so(tmp_path):
    path = composition_figure(summary(0.3, 0.05, with_compose=False), tmp_path / "c.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_report_has_the_value_error_table_when_given(tmp_path):
    errors = pd.DataFrame([{"model": m, "parameterization": p, "attribute": "positivity", "target": t,
                            "mse": 0.25, "spearman": 0.5, "n_states": 4, "n_pairs": 32, "n_ranked_states": 4,
                            "mc_noise_mse": 0.01, "target_var": 0.5}
                           for m, p in (("positivity", "scalar"), ("positivity.qhead", "qhead"))
                           for t in ("mean", "soft_beta_1.0")])
    text = write_report(summary(0.3, 0.05), tmp_path, value_error=errors)["report"].read_text()
    assert "## Value error against Monte-Carlo estimates" in text
    assert "| positivity.qhead | soft_beta_1.0 |" in text and "0.250" in text
    assert "Value error" not in write_report(summary(0.3, 0.05), tmp_path)["report"].read_text()


def test_lift_over_base_says_whether_the_intervals_are_apart():
    # base 0.1 ± 0.05; the best VAS row is beta 4 at vas_gold - 0.025.
    assert "are apart" in lift_over_base(summary(0.3, 0.05))                 # 0.275 - 0.05 > 0.15
    assert "are not apart" in lift_over_base(summary(0.2, 0.05))             # 0.175 - 0.05 < 0.15
    assert lift_over_base(summary(0.3, 0.05).query("method != 'vas'")) == ""
    # A looping row does not count: with beta 4 collapsed, the best eligible row is beta 1.
    looping = summary(0.3, 0.05)
    looping.loc[(looping.method == "vas") & (looping.param_beta == 4.0), "distinct_2"] = 0.2
    assert "(beta=1) 0.200" in lift_over_base(looping)


def test_report_describes_a_real_world_and_a_skipped_baseline(tmp_path):
    world = {"base_model": {"embedded": False, "source": "/m/smollm2", "gguf": "/p/SmolLM2.gguf",
                            "weights_sha256": "11d5b668dc68ffff"},
             "gold_agreement": {"spearman": 0.466, "n": 14121, "spearman_movie": 0.44, "spearman_amazon": 0.59},
             "dpo_skipped": "too slow on 2 cores",
             "reward_models": {"positivity": {"heldout_accuracy": 0.7012, "gold_ceiling_accuracy": 0.858,
                                              "pairs_by_origin": {"sampled": 768, "human_snippets": 5991}},
                               "conciseness": {"heldout_accuracy": 0.64, "pairs_by_origin": {"sampled": 760}}}}
    text = write_report(summary(0.3, 0.05), tmp_path, world=world)["report"].read_text()
    assert "Lift over base sampling" in text and "## The world" in text
    assert "/m/smollm2, converted from SmolLM2.gguf (weights sha256 11d5b668dc68)" in text
    assert "14121 held-out snippets: Spearman 0.466 (movie 0.440, amazon 0.590)" in text
    assert "DPO baseline skipped: too slow on 2 cores." in text
    assert ("ranking held-out pairs of the base model's completions: conciseness 0.640; positivity 0.701 "
            "(the gold itself: 0.858), from 5,991 human-continuation and 768 sampled pairs.") in text
    (tmp_path / "e").mkdir()
    embedded = write_report(summary(0.3, 0.05), tmp_path / "e", world={"base_model": {"embedded": True}})
    assert "## The world" not in embedded["report"].read_text()


def test_lift_across_seeds_counts_the_seeds_whose_intervals_are_apart(tmp_path):
    # Seed 0: VAS beta 4 at 0.275 ± 0.05 against base 0.1 ± 0.05 (apart); seed 1: VAS at 0.175 (not apart).
    per_seed = pd.concat([summary(0.3, 0.05).assign(seed=0), summary(0.2, 0.05).assign(seed=1)], ignore_index=True)
    text = lift_across_seeds(per_seed)
    assert text.startswith("Across 2 seeds (0, 1): vas beta=4.0, parameterization=scalar")
    # mean (0.275 + 0.175) / 2 = 0.225, sd (ddof=1) = 0.0707; base 0.1 in both seeds, sd 0
    assert "0.225 ± 0.071 gold positivity (mean ± sd) at 4.00 nats, base 0.100 ± 0.000" in text
    assert text.endswith("apart in 1 of 2 seeds.")
    # Within 2.5 nats (beta 4 spends 4 in both seeds) beta 1 is the best setting.
    assert lift_across_seeds(per_seed, max_kl=2.5).startswith("Across 2 seeds (0, 1): vas beta=1.0")
    assert lift_across_seeds(per_seed, max_kl=0.5) == ""
    assert lift_across_seeds(None) == "" and lift_across_seeds(per_seed.query("method != 'base'")) == ""
    # Beta 4 collapses diversity in seed 1 only: it does not count in any, and beta 1 is the best.
    per_seed.loc[(per_seed.seed == 1) & (per_seed.param_beta == 4.0), "distinct_2"] = 0.2
    assert lift_across_seeds(per_seed).startswith("Across 2 seeds (0, 1): vas beta=1.0")
    report = write_report(summary(0.3, 0.05), tmp_path, per_seed=per_seed)
    assert "are apart. Across 2 seeds" in report["report"].read_text()


def test_report_has_the_serving_numbers_when_measured(tmp_path):
    def row(tokens_per_s, upstream=0.0):
        return {"tokens_per_s": tokens_per_s, "upstream_requests_per_token": upstream}

    serving = {"rows": {"base_c1": row(20.0), "base_c4": row(21.0), "vas_c1": row(19.0), "vas_c1_top20": row(18.0),
                        "blackbox_llamacpp_vas_c1": row(1.6, 1.0)},
               "settings": {"requests": 8, "max_tokens": 24, "beta": 16.0}, "git_sha": "abc1234def",
               "measured_at": "2026-11-30 10:00 UTC"}
    text = write_report(summary(0.3, 0.05), tmp_path, serving=serving)["report"].read_text()
    assert "## Serving (bench/serve.py)" in text
    assert "8 held-out prompts, 24 new tokens each" in text and "; measured 2026-11-30 10:00 UTC at commit abc1234." in text
    assert "| VAS, white-box | 19.0 | x0.95 | 0.00 |" in text                       # 19 / 20
    assert "| black-box VAS, llama.cpp serving the base's GGUF as the upstream | 1.6 | x0.08 | 1.00 |" in text
    assert "`vas serve` as the upstream" not in text                              # a row not measured is left out
    (tmp_path / "none").mkdir()
    assert "Serving" not in write_report(summary(0.3, 0.05), tmp_path / "none")["report"].read_text()


def test_report_has_the_load_test_table_when_measured(tmp_path):
    def row(tokens_per_s, ttft=0.01, p50=0.1, p99=0.3):
        return {"tokens_per_s": tokens_per_s, "ttft_p50_s": ttft, "latency_p50_s": p50, "latency_p99_s": p99}

    serving = {"rows": {"base_c1": row(200.0), "base_c16": row(1000.0, 0.05, 0.4, 0.9),
                        "vas_c1": row(100.0), "vas_c16": row(450.0, 0.06, 0.5, 1.2)},
               "settings": {"requests": 16, "max_tokens": 48, "beta": 16.0}}
    text = write_report(summary(0.3, 0.05), tmp_path, serving=serving)["report"].read_text()
    assert "| 1 | 200 | x1.00 | 100 | x1.00 | 10 ms | 100 / 300 ms | 100 / 300 ms |" in text
    assert "| 16 | 1000 | x5.00 | 450 | x4.50 | 50 ms | 400 / 900 ms | 500 / 1200 ms |" in text
    one_level = {"rows": {"base_c1": row(200.0), "vas_c1": row(100.0)}, "settings": {}}
    (tmp_path / "one").mkdir()
    assert "The load test" not in write_report(summary(0.3, 0.05), tmp_path / "one", serving=one_level)[
        "report"].read_text()
