"""The seed study: aggregation across seeds, the VAS / Best-of-N lift ratio, the report's verdict,
and `vas study` end to end on the smoke profile."""

import json
import math
import shutil

import duckdb
import pandas as pd
import pytest

from models.evaluation.report import report_verdict
from models.evaluation.study import aggregate, lift_ratio, ratio_sentence, study_markdown


def row(seed, method, params, gold, distinct, forwards, **extra):
    return {"seed": seed, "method": method, "params": json.dumps(params, sort_keys=True),
            "gold_positivity_mean": gold, "gold_positivity_ci95": 0.05, "learned_positivity_mean": gold / 2,
            "gold_conciseness_mean": 0.7, "gold_conciseness_ci95": 0.02, "kl_nats_mean": forwards / 10,
            "distinct_2": distinct, "mean_tokens": 20.0, "seconds_per_sample": 0.01 * forwards,
            "gold_positivity_winrate": 0.5, "base_forwards_per_sample": forwards, "repeat_4gram_share": 0.0, **extra}


def seed_rows(seed, base, bon, vas_scalar1, vas_scalar8, vas_qhead2, args2=None):
    """base, Best-of-2 and Best-of-4 (distinct-2 0.5, so the VAS bar is 0.45), four VAS rows, and an
    ARGS row at 8 forwards when args2 is given."""
    return [
        row(seed, "base", {}, base, 0.5, 1.0),
        row(seed, "bon", {"n": 2}, (base + bon) / 2, 0.5, 2.0, param_n=2),
        row(seed, "bon", {"n": 4}, bon, 0.5, 4.0, param_n=4),
        row(seed, "vas", {"beta": 1.0, "parameterization": "scalar"}, vas_scalar1, 0.45, 2.0,
            param_beta=1.0, param_parameterization="scalar"),
        # the highest reward of all, but distinct-2 0.3 < 0.9 x base's 0.5: never the best VAS row
        row(seed, "vas", {"beta": 8.0, "parameterization": "scalar"}, vas_scalar8, 0.3, 2.0,
            param_beta=8.0, param_parameterization="scalar"),
        # distinct-2 exactly 0.9 x base's: eligible
        row(seed, "vas", {"beta": 2.0, "parameterization": "qhead"}, vas_qhead2, 0.45, 1.0,
            param_beta=2.0, param_parameterization="qhead"),
        # the best reward, base's distinct-2, but 6% more of its samples loop than base's: never the best
        row(seed, "vas", {"beta": 16.0, "parameterization": "scalar"}, 0.99, 0.5, 2.0,
            param_beta=16.0, param_parameterization="scalar", repeat_4gram_share=0.06),
    ] + ([row(seed, "args", {"weight": 2.0, "attribute": "positivity"}, args2, 0.5, 8.0, param_weight=2.0)]
         if args2 is not None else [])


def study_frame() -> pd.DataFrame:
    # seed 0: base 0.1, Best-of-4 0.5 (lift 0.4); best eligible VAS = qhead beta 2 at 0.35 (lift 0.25)
    #         -> ratio 0.625, cost 1 / 4 = 0.25 forwards of Best-of-4's.
    # seed 1: base 0.2, Best-of-4 0.6 (lift 0.4); best eligible VAS = scalar beta 1 at 0.5 (lift 0.3)
    #         -> ratio 0.75, cost 2 / 4 = 0.5.
    return pd.DataFrame(seed_rows(0, 0.1, 0.5, 0.3, 0.6, 0.35) + seed_rows(1, 0.2, 0.6, 0.5, 0.9, 0.3))


def test_lift_ratio_per_seed_excludes_collapsed_diversity():
    ratio = lift_ratio(study_frame())
    s0, s1 = ratio["per_seed"]
    assert (s0["seed"], s1["seed"]) == (0, 1)
    assert s0["bon_n"] == 4 and s0["n_vas_rows"] == 4 and s0["n_vas_eligible"] == 2
    assert json.loads(s0["vas_params"]) == {"beta": 2.0, "parameterization": "qhead"}
    assert json.loads(s1["vas_params"]) == {"beta": 1.0, "parameterization": "scalar"}
    assert s0["ratio"] == pytest.approx(0.625) and s1["ratio"] == pytest.approx(0.75)
    assert s0["cost_vs_bon"] == pytest.approx(0.25) and s1["cost_vs_bon"] == pytest.approx(0.5)
    assert ratio["n_seeds"] == 2 and ratio["n_with_ratio"] == 2
    assert ratio["ratio_mean"] == pytest.approx(0.6875)
    # sample sd (ddof=1) of two values: |a - b| / sqrt(2); ddof=0 would give 0.0625
    assert ratio["ratio_sd"] == pytest.approx(0.125 / math.sqrt(2))
    assert ratio["cost_vs_bon_mean"] == pytest.approx(0.375)
    assert ratio["cost_vs_bon_sd"] == pytest.approx(0.25 / math.sqrt(2))


def test_lift_ratio_within_a_kl_budget():
    # KL is forwards / 10 here: qhead beta 2 spends 0.1 nats, scalar beta 1 0.2. A budget of 0.15
    # leaves seed 1 with qhead beta 2 (0.3: lift 0.1 of 0.4); seed 0 keeps it (0.625).
    ratio = lift_ratio(study_frame(), max_kl=0.15)
    s0, s1 = ratio["per_seed"]
    assert json.loads(s1["vas_params"]) == {"beta": 2.0, "parameterization": "qhead"}
    assert s0["ratio"] == pytest.approx(0.625) and s1["ratio"] == pytest.approx(0.25)
    assert s1["n_vas_eligible"] == 1 and ratio["max_kl"] == 0.15
    assert "and a KL of at most 0.15 nats reaches ratio mean" in ratio_sentence(ratio)
    assert "KL of at most" not in ratio_sentence(lift_ratio(study_frame()))
    # ARGS is not held to the budget: VAS must beat its best row wherever it lies (8 forwards, 0.8 nats).
    frame = pd.DataFrame(seed_rows(0, 0.1, 0.5, 0.3, 0.6, 0.35, args2=0.3))
    assert lift_ratio(frame, max_kl=0.15)["per_seed"][0]["args_gold"] == pytest.approx(0.3)
    none = lift_ratio(study_frame(), max_kl=0.05)
    assert none["n_with_ratio"] == 0 and "and a KL of at most 0.05 nats in 2)" in ratio_sentence(none)


def test_no_eligible_vas_row_gives_no_ratio():
    frame = study_frame()
    # only the collapsed beta 8 and the looping beta 16 left
    frame = frame[~((frame.method == "vas") & (frame.distinct_2 >= 0.4) & (frame.repeat_4gram_share == 0))]
    ratio = lift_ratio(frame)
    assert all(s["vas_params"] is None and math.isnan(s["ratio"]) for s in ratio["per_seed"])
    assert ratio["n_with_ratio"] == 0 and math.isnan(ratio["ratio_mean"])
    assert "no lift ratio" in ratio_sentence(ratio)
    assert "no VAS setting kept distinct-2 at least 0.9x base sampling's (or Best-of-N's, where lower) and a share " \
           "of samples repeating a 4-gram at most 0.05 above base's in 2)" in ratio_sentence(ratio)


def test_a_seed_where_best_of_n_did_not_lift_is_named_as_such():
    # seed 1's Best-of-4 (0.15) below its base (0.2): no ratio there, although VAS rows are eligible.
    frame = pd.DataFrame(seed_rows(0, 0.1, 0.5, 0.3, 0.6, 0.35) + seed_rows(1, 0.2, 0.15, 0.5, 0.9, 0.3))
    text = ratio_sentence(lift_ratio(frame))
    assert "(seed 0: 0.62 (" in text and "; seed 1" not in text
    assert text.endswith(" No ratio in seed 1: Best-of-4 did not lift gold positivity over base there.")
    assert "no VAS setting" not in text


def test_args_rows_are_compared_with_vas_per_seed():
    # seed 0: ARGS 0.3 (lift 0.2 of 0.4: 0.5) at 8 / 4 = 2x Best-of-4's forwards; VAS 0.35 at 0.25x beats it.
    # seed 1: ARGS 0.55 (0.875) beats VAS's 0.5, so VAS does not beat it there.
    frame = pd.DataFrame(seed_rows(0, 0.1, 0.5, 0.3, 0.6, 0.35, args2=0.3) + seed_rows(1, 0.2, 0.6, 0.5, 0.9, 0.3,
                                                                                   args2=0.55))
    ratio = lift_ratio(frame)
    s0, s1 = ratio["per_seed"]
    assert s0["args_ratio"] == pytest.approx(0.5) and s1["args_ratio"] == pytest.approx(0.875)
    assert s0["args_cost_vs_bon"] == pytest.approx(2.0)
    assert s0["beats_args"] is True and s1["beats_args"] is False
    assert ratio["n_with_args"] == 2 and ratio["n_beats_args"] == 1
    assert ratio["args_ratio_mean"] == pytest.approx(0.6875)
    text = ratio_sentence(ratio)
    assert "ARGS" in text and text.endswith("VAS beats it (more gold at no more cost) in 1 of 2 seeds.")
    # Without ARGS rows the sentence says nothing of it.
    assert "ARGS" not in ratio_sentence(lift_ratio(study_frame()))


def test_aggregate_mean_and_sample_sd_across_seeds():
    table = aggregate(study_frame())
    assert len(table) == 7 and (table.n_seeds == 2).all()
    base = table[table.method == "base"].iloc[0]
    assert base.gold_positivity_mean == pytest.approx(0.15)
    assert base.gold_positivity_mean_sd == pytest.approx(0.1 / math.sqrt(2))   # ddof=1
    assert base.learned_positivity_mean == pytest.approx(0.075)
    assert base.gold_conciseness_mean_sd == pytest.approx(0.0)
    bon4 = table[(table.method == "bon") & (table.param_n == 4)].iloc[0]
    assert bon4.gold_positivity_mean == pytest.approx(0.55) and bon4.base_forwards_per_sample == 4.0
    assert "seconds_per_sample" not in table and "gold_positivity_ci95" not in table

    # Three seeds 1, 2, 3: sd (ddof=1) is exactly 1 (ddof=0 would be 0.816).
    three = pd.DataFrame([row(s, "base", {}, float(s), 0.5, 1.0) for s in (1, 2, 3)])
    one = aggregate(three).iloc[0]
    assert one.n_seeds == 3 and one.gold_positivity_mean == pytest.approx(2.0)
    assert one.gold_positivity_mean_sd == pytest.approx(1.0)
    # one seed: no sd
    assert math.isnan(aggregate(three[three.seed == 1]).iloc[0].gold_positivity_mean_sd)


def test_study_markdown_has_the_verdict_and_every_row():
    frame = study_frame()
    text = study_markdown(aggregate(frame), lift_ratio(frame))
    assert "Across 2 seeds" in text and "0.69 ± 0.09" in text and "| 4-gram repeat share |" in text
    assert "| base | 2 | 0.150 ± 0.071 |" in text
    assert "| bon n=4 | 2 | 0.550 ± 0.071 |" in text
    assert "| vas beta=8.0, parameterization=scalar |" in text
    assert "| 0 | 0.100 | 0.500 (N=4) | vas beta=2.0, parameterization=qhead | 0.350 | 0.10 | 0.62 | 0.250 | - | - | - |" \
        in text
    with_args = pd.DataFrame(seed_rows(0, 0.1, 0.5, 0.3, 0.6, 0.35, args2=0.3))
    assert "| 0.62 | 0.250 | args weight=2.0 | 0.50 (2.000) | yes |" in study_markdown(aggregate(with_args),
                                                                                  lift_ratio(with_args))


def test_report_verdict_uses_the_study_when_there_is_one(tmp_path):
    frame = study_frame()
    summary = frame[frame.seed == 0].drop(columns="seed").assign(gold_positivity_ci95=0.05)
    single = report_verdict(summary, tmp_path / "study")
    assert single.startswith("Single run (one seed)") and "make study" in single
    (tmp_path / "study").mkdir()
    frame.to_parquet(tmp_path / "study" / "study.parquet")
    aggregate(frame).to_parquet(tmp_path / "study" / "aggregate.parquet")
    text = report_verdict(summary, tmp_path / "study")
    assert "seed study" in text and "Across 2 seeds" in text and "ratio mean ± sd = 0.69 ± 0.09" in text
    assert "Best-of-4" in text


@pytest.mark.integration
def test_vas_study_on_the_smoke_profile(smoke_world, tmp_path, monkeypatch, capsys):
    from orchestration.cli import main

    data = tmp_path / "data"
    shutil.copytree(smoke_world["data_dir"], data)
    # The CLI sets these for the process; monkeypatch puts them back afterwards.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("VAS_DATA_DIR", str(data))
    monkeypatch.setenv("VAS_PROFILE", "smoke")
    monkeypatch.setenv("VAS_DEVICE", "cpu")

    # Seeds 0 and 2: under about half the other seeds (1, 3, 6, 7, ...) the smoke profile's one-layer
    # model writes a whitespace-only completion in its rollouts, which the blocking rollouts suite refuses.
    assert main(["study", "--seeds", "0", "2", "--profile", "smoke", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "# VAS seed study" in out
    # Seed 0 is the main run's seed: the main run is its run, re-used (nothing changed since), not
    # retrained in a copy; tests/test_determinism.py shows a copy would give the same numbers.
    assert not (data / "study" / "seed_0").exists()
    assert "seed 0: the main run's seed" in out
    assert out.count("unchanged, re-used from run") >= 3     # rollouts, value_models, evaluation
    folder = data / "study" / "seed_2"
    assert (folder / "eval" / "summary.parquet").is_file() and (folder / "value_models").is_dir()
    assert (folder / "corpus" / "corpus.parquet").is_file() and (folder / "dpo_model").is_dir()
    assert not (folder / "report").exists()
    per_seed = pd.read_parquet(data / "study" / "study.parquet")
    assert sorted(per_seed.seed.unique()) == [0, 2]
    table = pd.read_parquet(data / "study" / "aggregate.parquet")
    assert table[table.method == "base"].n_seeds.tolist() == [2]
    base = per_seed[per_seed.method == "base"].set_index("seed").gold_positivity_mean
    assert base[0] != base[2]   # another seed, other samples
    assert (data / "study" / "study.md").read_text().startswith("# VAS seed study")
    # seed 0's rows are the main run's
    main_summary = pd.read_parquet(data / "eval" / "summary.parquet")
    seed0 = per_seed[per_seed.seed == 0].drop(columns="seed").reset_index(drop=True)
    assert seed0.gold_positivity_mean.tolist() == main_summary.gold_positivity_mean.tolist()
    assert seed0.kl_nats_mean.tolist() == main_summary.kl_nats_mean.tolist()

    # each seed's assets recorded the study seed in their params
    conn = duckdb.connect(str(data / "study" / "seed_2" / "metrics.duckdb"), read_only=True)
    params = dict(conn.execute("select asset, params from lineage").fetchall())
    conn.close()
    assert {json.loads(params[a])["seed"] for a in ("rollouts", "value_models", "evaluation")} == {2}

    conn = duckdb.connect(str(data / "metrics.duckdb"), read_only=True)
    rows = conn.execute("select run_id, metric, method, value from metrics where asset = 'seed_study'").fetchall()
    conn.close()
    assert rows and all(r[0].startswith("study-") for r in rows)
    metrics = {r[1] for r in rows}
    assert {"gold_positivity_mean/seed_mean", "gold_positivity_mean/seed_sd", "n_seeds"} <= metrics
    base_mean = [r[3] for r in rows if r[1] == "gold_positivity_mean/seed_mean" and r[2] == "base"]
    assert base_mean == [pytest.approx(base.mean())]

    # the report now takes its verdict from the study
    report = (data / "report" / "report.md").read_text()
    assert "From the seed study" in report and "Across 2 seed" in report


def test_the_study_copies_what_is_upstream_of_the_retrained_assets():
    from orchestration.cli import STUDY_RETRAINS, study_upstream

    upstream = study_upstream()
    assert {"corpus", "base_model", "prompts", "preference_pairs", "reward_models", "dpo_model"} <= set(upstream)
    assert not set(upstream) & {*STUDY_RETRAINS, "report"}
    assert upstream["corpus"] == "corpus/corpus.parquet"


def test_best_of_n_pools_of_two_seeds_share_no_candidate():
    """Candidate k samples with seed + stride·k: candidate 0 is the method's own seed (Best-of-1 is
    base sampling), and seeds 0, 1, 2 of a study draw disjoint pools (with seed + k they shared 127
    of 128 candidates, and a study's Best-of-N barely moved)."""
    from types import SimpleNamespace

    from models.evaluation.evaluation import EvalConfig, Evaluator

    def pool(seed: int) -> set[int]:
        evaluator = SimpleNamespace(config=EvalConfig(seed=seed))
        return {Evaluator.sampling(evaluator, k).seed for k in range(128)}

    assert Evaluator.sampling(SimpleNamespace(config=EvalConfig(seed=3)), 0).seed == 3
    pools = [pool(s) for s in (0, 1, 2)]
    assert all(len(p) == 128 for p in pools)
    assert not (pools[0] & pools[1]) and not (pools[0] & pools[2]) and not (pools[1] & pools[2])
