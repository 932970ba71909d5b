"""Integration: the smoke graph through Dagster (dg.materialize), DVC hashes, DuckDB rows."""

import json
import subprocess
import sys

import duckdb
import numpy as np
import pandas as pd
import pytest

from assets.common import output_path
from models.artifacts import dvc_md5
from models.lm.lm import read_manifest, weights_sha256
from models.profiles import PROJECT_ROOT
from models.stages import STAGES

pytestmark = pytest.mark.integration
ASSETS = ["imported_preferences", "corpus", "base_model", "prompts", "preference_pairs", "reward_models",
          "rollout_shards", "rollouts",
          "value_backbone", "value_models", "dpo_model", "report", "evaluation", "value_error"]


def test_definitions_load():
    from orchestration.definitions import defs

    job = defs.resolve_job_def("full_pipeline")
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert set(ASSETS) <= keys
    checks = {c.name for c in defs.resolve_asset_graph().asset_check_keys}
    assert {"prompts_suite", "preference_pairs_suite", "base_model_samples_vary", "rollouts_suite",
            "imported_preferences_suite"} <= checks
    assert job is not None


def test_dagster_definitions_validate_cli():
    proc = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["decode.py", "frontier.py", "serve.py", "value_estimates.py", "reward_ensemble.py"])
def test_bench_scripts_run_as_scripts(script):
    # The tests below call each benchmark's main(); this runs the file as `make bench*` does.
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "bench" / script), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr


def test_smoke_graph_materializes_with_passing_checks(smoke_world):
    result = smoke_world["result"]
    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == set(ASSETS)
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["prompts_suite"] and checks["preference_pairs_suite"] and checks["rollouts_suite"]
    assert checks["imported_preferences_suite"]  # nothing imported yet is not a failure


def test_data_versions_are_dvc_md5_of_outputs(smoke_world):
    settings = smoke_world["settings"]
    for event in smoke_world["result"].get_asset_materialization_events():
        asset = event.asset_key.to_user_string()
        mat = event.event_specific_data.materialization
        on_disk = dvc_md5(output_path(settings, asset))
        assert mat.metadata["dvc_md5"].value == on_disk
        assert mat.tags["dagster/data_version"] == on_disk


def test_base_model_reloads_and_stays_frozen(smoke_world):
    from transformers import AutoModelForCausalLM

    base = smoke_world["data_dir"] / "base_model"
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.config.model_type == "gpt2"
    # prompts and preference_pairs ran after base_model: the weights are unchanged.
    assert weights_sha256(base) == read_manifest(base)["weights_sha256"]
    event = [e for e in smoke_world["result"].get_asset_materialization_events()
             if e.asset_key.to_user_string() == "base_model"][0]
    assert event.event_specific_data.materialization.metadata["weights_sha256"].value == weights_sha256(base)


def test_datasets_have_expected_shape(smoke_world):
    data = smoke_world["data_dir"]
    prompts = pd.read_parquet(data / "prompts" / "prompts.parquet")
    assert (prompts.split == "train").sum() == 16 and (prompts.split == "eval").sum() == 8
    pairs = pd.read_parquet(data / "preference_pairs" / "pairs.parquet")
    assert set(pairs.attribute) == {"positivity", "conciseness"}
    assert (pairs.chosen != pairs.rejected).all()
    assert set(pairs.prompt_id) <= set(prompts[prompts.split == "train"].prompt_id)


def test_duckdb_has_metrics_and_lineage_once_per_asset(smoke_world):
    run_id = smoke_world["result"].run_id
    con = duckdb.connect(str(smoke_world["data_dir"] / "metrics.duckdb"), read_only=True)
    try:
        lineage = con.execute("SELECT asset, inputs, output_md5 FROM lineage WHERE run_id = ?", [run_id]).fetchall()
        # One row per asset, and one per shard of rollout_shards (rollout_shards/<shard>).
        assert sorted(a for a, _, _ in lineage) == sorted(ASSETS + ["rollout_shards/0", "rollout_shards/1"])
        by_asset = {a: (json.loads(i), md5) for a, i, md5 in lineage}
        for shard in ("0", "1"):
            assert by_asset["rollouts"][0][f"rollout_shards/{shard}"] == by_asset[f"rollout_shards/{shard}"][1]
        # Lineage inputs are the upstream outputs' md5s.
        assert by_asset["prompts"][0] == {"base_model": by_asset["base_model"][1]}
        assert set(by_asset["preference_pairs"][0]) == {"base_model", "prompts", "imported_preferences"}
        assert by_asset["value_models"][0]["rollouts"] == by_asset["rollouts"][1]
        metrics = dict(con.execute(
            "SELECT asset || '/' || metric, value FROM metrics WHERE run_id = ? AND step IS NULL", [run_id]
        ).fetchall())
        assert metrics["corpus/n_reviews"] == 600
        assert metrics["base_model/eval_perplexity"] > 1
        assert metrics["preference_pairs/n_pairs"] > 0
        assert metrics["preference_pairs:preference_pairs_suite/check.preference_pairs_suite.passed"] == 1.0
        dupes = con.execute("SELECT count(*) FROM (SELECT asset, metric, step, method, params FROM metrics WHERE run_id = ? "
                            "GROUP BY ALL HAVING count(*) > 1)", [run_id]).fetchone()[0]
        assert dupes == 0
        curve = con.execute("SELECT count(*) FROM metrics WHERE run_id = ? AND metric = 'train_loss' "
                            "AND step IS NOT NULL", [run_id]).fetchone()[0]
        assert curve > 0
    finally:
        con.close()


def test_rematerializing_in_the_same_run_does_not_duplicate_rows(tmp_path):
    from assets.metrics_db import metric_row, write_rows

    con = duckdb.connect(str(tmp_path / "m.duckdb"))
    for value in (1.0, 2.0):
        write_rows(con, run_id="r1", asset="a", metrics=[metric_row("x", value)], params={"p": 1},
                   data_version="d", model_version=None, git_sha="g",
                   lineage={"inputs": {}, "output_md5": "d"})
    assert con.execute("SELECT value FROM metrics").fetchall() == [(2.0,)]
    assert con.execute("SELECT count(*) FROM lineage").fetchone()[0] == 1


def test_outputs_match_dvc_yaml():
    import yaml

    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    for asset, stage in STAGES.items():
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stages[asset]["outs"]]
        assert outs == [f"data/{stage.output}"]
        assert f"vas materialize {asset}" in stages[asset]["cmd"]


def test_rollouts_store_tokens_logprobs_and_every_reward(smoke_world):
    data = smoke_world["data_dir"]
    df = pd.read_parquet(data / "rollouts" / "rollouts.parquet")
    assert len(df) == 16 * 4                                    # n_train prompts x samples_per_prompt
    for column in ("prompt_ids", "completion_ids", "base_logprobs", "finished", "n_tokens",
                   "learned_positivity", "learned_conciseness", "gold_positivity", "gold_conciseness"):
        assert column in df.columns
    row = df.iloc[0]
    assert len(row.completion_ids) == len(row.base_logprobs) == row.n_tokens
    assert (df.base_logprobs.map(lambda lp: max(lp) <= 0)).all()


def test_value_models_saved_per_attribute_and_parameterization(smoke_world):
    from models.value.value_model import ValueModel

    root = smoke_world["data_dir"] / "value_models"
    names = sorted(p.name for p in root.iterdir())
    # The primary parameterization for every attribute, the extra one (scalar) for positivity only,
    # and the per-token head distilled from that scalar (value_models.distill_from).
    assert names == ["conciseness", "positivity", "positivity.distilled", "positivity.scalar"]
    meta = json.loads((root / "positivity" / "vas_value.json").read_text())
    assert meta["parameterization"] == "distributional_qhead" and meta["reward"] == "learned_positivity"
    assert meta["base_weights_sha256"] == read_manifest(smoke_world["data_dir"] / "base_model")["weights_sha256"]
    loaded = ValueModel.load(root / "positivity")
    assert loaded.parameterization == "distributional_qhead" and loaded.support.n_bins == 41
    assert ValueModel.load(root / "positivity.scalar").parameterization == "scalar"
    distilled = json.loads((root / "positivity.distilled" / "vas_value.json").read_text())
    assert distilled["parameterization"] == "distilled" and distilled["teacher"] == "positivity.scalar"
    head = ValueModel.load(root / "positivity.distilled")
    assert head.parameterization == "qhead" and head.frozen_backbone and head.factor_source == "embedding"
    assert not list((smoke_world["data_dir"] / ".checkpoints").rglob("progress.json"))   # cleared after saving


def test_value_models_start_from_the_smaller_value_backbone(smoke_world):
    """value_backbone: a GPT-2 smaller than the base model, on the base tokenizer (smoke: 1 x 16
    against 1 x 32), and every value model's backbone starts from its weights (lineage: its sha256)."""
    from transformers import AutoConfig

    from models.lm.lm import check_same_vocabulary, weights_sha256
    from models.value.value_model import ValueModel

    data = smoke_world["data_dir"]
    small, base = (AutoConfig.from_pretrained(data / name) for name in ("value_backbone", "base_model"))
    assert (small.n_layer, small.n_embd) == (1, 16) and small.n_embd < base.n_embd
    check_same_vocabulary(data / "base_model", data / "value_backbone")              # raises if not
    sha = weights_sha256(data / "value_backbone")
    for name in ("positivity", "conciseness", "positivity.scalar"):
        model = ValueModel.load(data / "value_models" / name)
        assert model.backbone.config.hidden_size == 16
        assert model.init_info["init_weights_sha256"] == sha
    mat = next(e for e in smoke_world["result"].get_asset_materialization_events()
               if e.asset_key.to_user_string() == "value_backbone").event_specific_data.materialization
    assert mat.metadata["weights_sha256"].value == sha


def test_evaluation_samples_schema_and_invariants(smoke_world):
    samples = pd.read_parquet(smoke_world["data_dir"] / "eval" / "samples.parquet")
    expected = {"method", "params", "prompt_id", "prompt", "completion", "n_tokens", "kl_nats",
                "gold_positivity", "gold_conciseness", "learned_positivity", "learned_conciseness"}
    assert expected <= set(samples.columns)
    assert set(samples.method) == {"base", "bon", "args", "vas", "vas_rerank", "compose", "dpo"}
    for params in samples.params:
        json.loads(params)
    key = ["prompt_id", "draw"]
    base = samples[samples.method == "base"].sort_values(key).reset_index(drop=True)
    bon1 = samples[(samples.method == "bon") & (samples.params == '{"n": 1}')].sort_values(key).reset_index(drop=True)
    # Best-of-1 is base sampling: the same completions for the same prompts and seeds.
    assert bon1.completion.tolist() == base.completion.tolist()
    assert (bon1.kl_nats == 0).all()
    vas0 = samples[(samples.method == "vas") & samples.params.str.contains('"beta": 0.0')]
    assert len(vas0) and (vas0.kl_nats.abs() < 1e-9).all()
    for _, group in vas0.groupby("params"):
        assert group.sort_values(key).completion.tolist() == base.completion.tolist()
    steered = samples[(samples.method == "vas") & samples.params.str.contains('"beta": 2.0')]
    assert (steered.kl_nats >= 0).all()
    # Soft, mean and calibrated decoding of the distributional model are all there, and differ.
    calibrated = steered.params.str.contains('"calibrated": true')
    soft = steered[steered.params.str.contains('"soft": true')].sort_values(key)
    mean = steered[steered.params.str.contains('"soft": false') & ~calibrated].sort_values(key)
    by_quantile = steered[calibrated].sort_values(key)
    assert len(soft) == len(mean) == len(by_quantile) == len(base)
    # They sample from different distributions (their exact KLs differ); on 8 prompts of the barely
    # trained smoke world two of them may still draw the same tokens, so not every pair of texts differs.
    assert len({round(float(d.kl_nats.mean()), 9) for d in (soft, mean, by_quantile)}) == 3
    texts = [soft.completion.tolist(), mean.completion.tolist(), by_quantile.completion.tolist()]
    assert texts[0] != texts[1] or texts[0] != texts[2]
    # ARGS (the reward model at every prefix) with weight 0 is base sampling too; weight 2 steers.
    args = samples[samples.method == "args"]
    args0 = args[args.params.str.contains('"weight": 0.0')].sort_values(key)
    assert args0.completion.tolist() == base.completion.tolist() and (args0.kl_nats == 0).all()
    assert (args[args.params.str.contains('"weight": 2.0')].kl_nats > 0).any()
    # VAS + rerank: KL = the kept sample's log pi/pi0 + log N - (N-1)/N.
    rerank = samples[samples.method == "vas_rerank"]
    assert len(rerank) == len(base)
    assert np.allclose(rerank.kl_nats, rerank.log_ratio + np.log(2) - 0.5)


def test_evaluation_metrics_in_duckdb_once_per_run(smoke_world):
    run_id = smoke_world["result"].run_id
    con = duckdb.connect(str(smoke_world["data_dir"] / "metrics.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT method, params, metric, count(*) FROM metrics WHERE run_id = ? AND "
                           "asset = 'evaluation' AND method IS NOT NULL GROUP BY ALL", [run_id]).fetchall()
    finally:
        con.close()
    assert rows and all(n == 1 for *_, n in rows)
    by_method = {}
    for method, params, metric, _ in rows:
        by_method.setdefault((method, params), set()).add(metric)
    summary = pd.read_parquet(smoke_world["data_dir"] / "eval" / "summary.parquet")
    assert len(by_method) == len(summary)            # every method and setting has its metrics
    for (method, _), metrics in by_method.items():
        if method == "tilt":                         # a reference estimated on the pool, not a decoder
            assert {"gold_positivity_mean", "learned_positivity_mean", "kl_nats_mean", "ess_mean"} <= metrics
            continue
        assert {"gold_positivity_mean", "gold_positivity_ci95", "kl_nats_mean", "distinct_2", "repeat_4gram_share",
                "seconds_per_sample", "base_forwards_per_sample", "learned_positivity_mean"} <= metrics
    bon = summary[summary.method == "bon"].set_index("param_n")
    assert bon.loc[4, "kl_nats_mean"] == pytest.approx(np.log(4) - 3 / 4)
    # The exact tilt on Best-of-4's pool: one row per tilt beta, its KL within [0, log 4], its learned
    # reward growing with beta and never above Best-of-4's (a weighted mean of a pool is <= its max).
    tilt = summary[summary.method == "tilt"].sort_values("param_beta")
    assert len(tilt) == 9 and tilt.kl_nats_mean.between(0, np.log(4) + 1e-9).all()
    assert (np.diff(tilt.learned_positivity_mean) >= -1e-9).all()
    assert (tilt.learned_positivity_mean <= bon.loc[4, "learned_positivity_mean"] + 1e-9).all()


def test_decode_benchmark_runs_and_writes_every_key(smoke_world):
    sys.path.insert(0, str(PROJECT_ROOT))
    from bench.decode import BACKBONE_KEYS, KEYS
    from bench.decode import main as bench_main

    data = smoke_world["data_dir"]
    assert bench_main(["--data-dir", str(data), "--prompts", "4", "--batch-size", "4", "--max-new-tokens", "4",
                       "--value-train-steps", "2", "--device", "cpu"]) == 0
    result = json.loads((data / "bench" / "decode.json").read_text())
    for key in KEYS + BACKBONE_KEYS:
        assert result[key] > 0
    assert result["device"] == "cpu"


def test_serving_benchmark_measures_each_concurrency_and_the_black_box(smoke_world, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    sys.path.insert(0, str(PROJECT_ROOT))
    from bench.serve import main as serve_main

    # Refreshing the report points the environment at this data folder and profile (as `vas study`
    # does), in an instance of the test's own: undone at the end.
    for key in ("VAS_PROFILE", "VAS_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    data = smoke_world["data_dir"]
    assert serve_main(["--data-dir", str(data), "--requests", "3", "--concurrency", "1", "3",
                       "--max-tokens", "3", "--profile", "smoke", "--llamacpp", "auto"]) == 0
    result = json.loads((data / "bench" / "serve.json").read_text())
    # --llamacpp auto: the smoke base model was not converted from a GGUF, so no llama.cpp row.
    assert set(result["rows"]) == {"base_c1", "base_c3", "vas_c1", "vas_c3", "vas_c1_top20", "blackbox_vas_c1",
                                   "blackbox_vas_c4"}
    # max(prompts, 4 x in flight) requests per level, every one answered and timed.
    assert {k: r["requests"] for k, r in result["rows"].items()} == {
        "base_c1": 4, "base_c3": 12, "vas_c1": 4, "vas_c3": 12, "vas_c1_top20": 4, "blackbox_vas_c1": 4,
        "blackbox_vas_c4": 16}
    assert all(row["tokens_per_s"] > 0 and 0 < row["ttft_p50_s"] <= row["latency_p99_s"]
               for row in result["rows"].values())
    assert set(result["ratios"]) == {"base_c3_vs_c1", "vas_c3_vs_c1", "vas_vs_base_c1",
                                     "blackbox_vs_whitebox_vas_top20_c1", "blackbox_vas_c4_vs_c1"}
    assert result["measured_at"] and result["git_sha"]
    report = (data / "report" / "report.md").read_text()
    assert "## Serving (bench/serve.py)" in report and "3 held-out prompts, 3 new tokens each" in report
    assert f"{result['rows']['blackbox_vas_c1']['tokens_per_s']:.1f} |" in report
    assert f"| 3 | {result['rows']['base_c3']['tokens_per_s']:.0f} |" in report      # the load-test table


@pytest.mark.parametrize("what", ["compute", "iterate"])
def test_frontier_benchmark_runs(smoke_world, what):
    sys.path.insert(0, str(PROJECT_ROOT))
    from bench.frontier import main as frontier_main

    data = smoke_world["data_dir"]
    assert frontier_main([what, "--data-dir", str(data), "--samples-per-prompt", "1", "2", "--steps", "2",
                          "--top-k", "3", "--betas", "2"]) == 0
    rows = json.loads((data / "bench" / f"frontier_{what}.json").read_text())["rows"]
    # compute: 2 rollout budgets x 1 step count x 1 top-k x 1 beta; iterate: 2 rounds x 1 beta.
    assert len(rows) == 2 and all(r["kl_nats"] >= 0 and np.isfinite(r["learned"]) for r in rows)
    if what == "compute":
        n_train = len(pd.read_parquet(data / "prompts" / "prompts.parquet").query("split == 'train'"))
        assert [r["rollouts"] for r in rows] == [n_train, 2 * n_train]


def test_value_estimates_benchmark_measures_every_candidate(smoke_world):
    sys.path.insert(0, str(PROJECT_ROOT))
    from bench.value_estimates import main as value_main

    # reward_mc_more needs the human snippets of the real profile's prompts; the smoke world has none.
    CANDIDATES = ["head", "args", "reward_mc", "reward_td", "reward_body"]
    data = smoke_world["data_dir"]
    assert value_main(["--data-dir", str(data), "--profile", "smoke", "--candidates", *CANDIDATES,
                       "--steps", "2", "--prompts", "2",
                       "--prefix-lengths", "0", "2", "--candidates-per-state", "3", "--continuations", "2",
                       "--betas", "2", "--top-k", "3"]) == 0
    result = json.loads((data / "bench" / "value_estimates.json").read_text())
    assert [r["candidate"] for r in result["value_error"]] == CANDIDATES
    # Every candidate on the same states, each a finite error.
    assert len({r["states"] for r in result["value_error"]}) == 1 and result["value_error"][0]["states"] > 0
    assert all(np.isfinite(r["mse"]) for r in result["value_error"])
    assert [p["candidate"] for p in result["decode"]] == CANDIDATES
    # The reward model's candidates run a 1-layer body per candidate: more than one base forward per token.
    by_name = {p["candidate"]: p for p in result["decode"]}
    assert by_name["args"]["forwards_per_token"] > 1 and by_name["args"]["kl_nats"] > 0
    assert by_name["head"]["forwards_per_token"] < by_name["args"]["forwards_per_token"]


def test_value_estimates_benchmark_across_training_seeds(smoke_world):
    """--seeds: each trained candidate once per seed (distilled from that seed's reward_mc), a
    student on the seeds' mean teacher values, and mean ± sd across seeds."""
    sys.path.insert(0, str(PROJECT_ROOT))
    from bench.value_estimates import main as value_main

    data = smoke_world["data_dir"]
    assert value_main(["--data-dir", str(data), "--profile", "smoke", "--candidates", "distilled", "reward_mc",
                       "--seeds", "0", "1", "--steps", "2", "--distill-steps", "3", "--prompts", "2",
                       "--prefix-lengths", "0", "2", "--candidates-per-state", "3", "--continuations", "2",
                       "--betas", "2", "--top-k", "3"]) == 0
    result = json.loads((data / "bench" / "value_estimates.json").read_text())
    names = ["reward_mc@0", "distilled@0", "reward_mc@1", "distilled@1", "distilled_mean"]
    assert [r["candidate"] for r in result["value_error"]] == names          # the teacher before its student
    assert [r["seed"] for r in result["value_error"]] == [0, 0, 1, 1, 0]
    assert all(0 <= r["spearman_ceiling"] <= 1 or np.isnan(r["spearman_ceiling"]) for r in result["value_error"])
    across = {r["candidate"]: r for r in result["value_error_across_seeds"]}
    assert {k: r["seeds"] for k, r in across.items()} == {"reward_mc": 2, "distilled": 2, "distilled_mean": 1}
    mean, sd = (float(x) for x in across["reward_mc"]["spearman"].split(" ± "))
    by_seed = [r["spearman"] for r in result["value_error"] if r["candidate"].startswith("reward_mc@")]
    assert mean == pytest.approx(np.mean(by_seed), abs=1e-3) and sd == pytest.approx(np.std(by_seed, ddof=1), abs=1e-3)
    assert {(r["candidate"], r["beta"]) for r in result["decode_across_seeds"]} == {
        ("reward_mc", 2.0), ("distilled", 2.0), ("distilled_mean", 2.0)}


def test_reward_ensemble_benchmark_compares_objectives_at_equal_n(smoke_world):
    sys.path.insert(0, str(PROJECT_ROOT))
    from bench.reward_ensemble import main as ensemble_main

    data = smoke_world["data_dir"]
    assert ensemble_main(["--data-dir", str(data), "--profile", "smoke", "--members", "2", "--steps", "2",
                          "--ns", "1", "2", "--ks", "0", "1"]) == 0
    result = json.loads((data / "bench" / "reward_ensemble.json").read_text())
    rows = {(r["objective"], r["n"]): r for r in result["rows"]}
    assert set(rows) == {(o, n) for o in ("single (seed 0)", "mean - 0 sd", "mean - 1 sd", "worst case")
                         for n in (1, 2)}
    # Best-of-1 is base sampling whatever the objective.
    assert all(rows[(o, 1)]["gold"] == pytest.approx(result["base_gold"]) for o, _ in rows)


def test_sharpening_control_at_temperature_one_is_base_sampling(smoke_world):
    sys.path.insert(0, str(PROJECT_ROOT))
    from bench.frontier import Sharpened
    from bench.frontier import main as frontier_main
    from models.lm.lm import load_frozen_base
    from models.lm.sampling import SamplingConfig, sample

    data = smoke_world["data_dir"]
    model, tokenizer, _ = load_frozen_base(data / "base_model")
    prompts = pd.read_parquet(data / "prompts" / "prompts.parquet").prompt.tolist()[:6]
    config = SamplingConfig(max_new_tokens=8, seed=3, batch_size=6)
    plain, same = sample(model, tokenizer, prompts, config), sample(model, tokenizer, prompts, config,
                                                                     steering=Sharpened(1.0))
    assert same.completion_ids == plain.completion_ids and max(same.kl_nats) == 0.0
    assert min(sample(model, tokenizer, prompts, config, steering=Sharpened(0.25)).kl_nats) > 0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Sharpened(0.0)

    assert frontier_main(["temperature", "--data-dir", str(data), "--profile", "smoke", "--temperatures", "1", "0.25",
                          "--seeds", "0", "1"]) == 0
    rows = json.loads((data / "bench" / "frontier_temperature.json").read_text())["rows"]
    assert [(r["temperature"], r["seed"]) for r in rows] == [(1.0, 0), (1.0, 1), (0.25, 0), (0.25, 1)]
    assert all(r["kl_nats"] == 0.0 for r in rows[:2]) and all(r["kl_nats"] > 0 for r in rows[2:])


def test_decode_settings_bench_bounds_and_schedules_the_bonus(smoke_world):
    """bench/frontier.py settings: with no bound and a factor of 1 it is VAS with the saved default
    value model token for token; a bound of ~0 nats is base sampling; each grid point is one row."""
    sys.path.insert(0, str(PROJECT_ROOT))
    from bench.frontier import ClippedGuidance
    from bench.frontier import main as frontier_main
    from models.decoding.vas import VASConfig, vas_sample
    from models.lm.lm import load_frozen_base
    from models.lm.sampling import SamplingConfig, sample
    from models.value.value_model import ValueModel

    data = smoke_world["data_dir"]
    model, tokenizer, _ = load_frozen_base(data / "base_model")
    value = ValueModel.load(data / "value_models" / "positivity", base_model=model).eval()
    prompts = pd.read_parquet(data / "prompts" / "prompts.parquet").prompt.tolist()[:6]
    config, vas = SamplingConfig(max_new_tokens=8, seed=3, batch_size=6), VASConfig(top_k=8, soft=False)

    def steered(clip, decay):
        guidance = ClippedGuidance.make({"r": value}, {"r": 8.0}, vas, getattr(model, "base_model", None), clip, decay)
        return sample(model, tokenizer, prompts, config, steering=guidance)

    plain = vas_sample(model, tokenizer, prompts, {"r": value}, {"r": 8.0}, config, vas)
    assert max(plain.kl_nats) > 0
    same = steered(None, None)
    assert same.completion_ids == plain.completion_ids and same.kl_nats == plain.kl_nats
    base = sample(model, tokenizer, prompts, config)
    assert steered(1e-12, None).completion_ids == base.completion_ids
    assert max(steered(1e-12, None).kl_nats) < 1e-9
    assert max(steered(None, 1e-12).kl_nats) < max(plain.kl_nats)     # only the first step steered

    assert frontier_main(["settings", "--data-dir", str(data), "--profile", "smoke", "--top-k", "8", "--clip", "0",
                          "0.5", "--betas", "2", "--seeds", "0"]) == 0
    rows = json.loads((data / "bench" / "frontier_settings.json").read_text())["rows"]
    assert [(r["clip"], r["beta"]) for r in rows] == [(0.0, 2.0), (0.5, 2.0)]


def test_dpo_baseline_changes_a_copy_not_the_base(smoke_world):
    data = smoke_world["data_dir"]
    base_sha = read_manifest(data / "base_model")["weights_sha256"]
    assert weights_sha256(data / "base_model") == base_sha
    assert weights_sha256(data / "dpo_model") != base_sha
    samples = pd.read_parquet(data / "eval" / "samples.parquet")
    dpo = samples[samples.method == "dpo"]
    assert len(dpo) == (samples.method == "base").sum() and (dpo.kl_nats > 0).all()


def test_value_error_against_monte_carlo_per_model_and_target(smoke_world):
    from models.profiles import load_profile

    data = smoke_world["data_dir"]
    metrics = pd.read_parquet(data / "value_error" / "value_error.parquet")
    params = load_profile("smoke")["value_error"]
    # Every value model, and ARGS's estimate (the reward model read at each prefix) per attribute.
    saved = sorted(p.name for p in (data / "value_models").iterdir())
    attributes = {json.loads((data / "value_models" / m / "vas_value.json").read_text())["attribute"] for m in saved}
    models = saved + [f"args.{a}" for a in sorted(attributes)]
    targets = ["mean", *[f"soft_beta_{float(b)}" for b in params["betas"]]]

    def calibrated(model: str) -> bool:
        if model.startswith("args."):
            return False
        support = json.loads((data / "value_models" / model / "value_config.json").read_text()).get("support", {})
        return support.get("bin_values") is not None

    # One row per (value model, target), and every error is a number; models with calibrated bins
    # are also measured in their normal scores (the calibrated decoder's values).
    assert any(calibrated(m) for m in models) and not all(calibrated(m) for m in models)
    assert sorted(zip(metrics.model, metrics.target)) == sorted(
        (m, t) for m in models for t in targets + (["calibrated"] if calibrated(m) else []))
    assert np.isfinite(metrics.mse).all() and (metrics.mc_noise_mse >= 0).all()
    assert (metrics.n_pairs == metrics.n_states * params["n_candidates"]).all()
    pairs = pd.read_parquet(data / "value_error" / "pairs.parquet")
    assert len(pairs) == metrics[metrics.target == "mean"].n_pairs.sum()
    assert {"prefix_text", "candidate_token", "mc_mean", "mc_se_mean", "est_mean"} <= set(pairs.columns)
    assert "## Value error against Monte-Carlo estimates" in (data / "report" / "report.md").read_text()
    con = duckdb.connect(str(data / "metrics.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT method, params FROM metrics WHERE run_id = ? AND asset = 'value_error' "
                           "AND metric = 'mse'", [smoke_world["result"].run_id]).fetchall()
    finally:
        con.close()
    assert len(rows) == len(metrics) and {m for m, _ in rows} == set(models)


def test_headline_table_picks_the_rows_to_compare(smoke_world):
    from models.evaluation.evaluation import headline_rows, headline_table

    summary = pd.read_parquet(smoke_world["data_dir"] / "eval" / "summary.parquet")
    rows = headline_rows(summary)
    assert set(rows.method) == {"base", "dpo", "vas", "vas_rerank", "args"}          # smoke has no Best-of-16/128
    assert set(rows[rows.method == "vas"].family) == {"VAS scalar", "VAS distributional_qhead soft",
                                                      "VAS distributional_qhead calibrated",
                                                      "VAS distributional_qhead mean", "VAS distilled"}
    table = headline_table(summary)
    assert table.count("\n") == len(rows) + 1 and table.startswith("| method |")
