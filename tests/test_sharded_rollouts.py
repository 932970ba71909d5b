"""Sharded rollouts: rollout_shards (a partitioned asset, one partition per prompt shard) merged by
rollouts equal the unsharded rollouts row for row, whatever the number of shards or the order they
ran in; each row's draws are its own (seeded by seed, prompt position and sample index)."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from models.data.rollouts import RolloutConfig, merge_shards, prompts_per_batch, sample_rollouts, shard_prompts
from models.lm.sampling import SamplingConfig, inverse_cdf, row_uniforms, sample

WORDS = ["<eos>", "<pad>", "the", "kettle", "lamp", "is", "great", "awful", "and", "works", "not", "very"]


@pytest.fixture(scope="module")
def lm(tiny_gpt2, word_tokenizer):
    vocab = {w: i for i, w in enumerate(WORDS)}
    # init 1.0: peaked, varied next-token distributions, so different draws give different tokens
    return tiny_gpt2(len(vocab), seed=3, init=1.0), word_tokenizer(vocab)


def _prompts(n: int) -> pd.DataFrame:
    texts = ["the kettle", "the lamp is", "works and", "the lamp", "not very", "the kettle is great", "awful and",
             "is not"]
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(n)], "prompt": [texts[i % len(texts)] for i in range(n)]})


def test_inverse_cdf_never_draws_an_impossible_token_and_follows_the_probabilities():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.2, 0.0, 0.8, 0.0]]).repeat(2000, 1)
    u = torch.rand(len(probs), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = inverse_cdf(probs, u)
    assert set(tokens[0::2].tolist()) == {1, 3} and set(tokens[1::2].tolist()) == {0, 2}
    assert abs((tokens[1::2] == 2).double().mean().item() - 0.8) < 0.03
    # u rounding up to the row's total still lands on a possible token
    edge = inverse_cdf(torch.tensor([[0.3, 0.7, 0.0]]), torch.tensor([1.0 - 1e-17], dtype=torch.float64))
    assert edge.tolist() == [1]


def test_row_draws_do_not_depend_on_batch_composition(lm):
    """The same rows with their own numbers give the same tokens alone, in other batches, in
    another order: a row's draws are its own."""
    model, tokenizer = lm
    prompts = _prompts(8).prompt.tolist()
    config = SamplingConfig(max_new_tokens=10, batch_size=8)
    keys = [(0, i, 0) for i in range(8)]
    uniforms = row_uniforms(keys, config.max_new_tokens)
    whole = sample(model, tokenizer, prompts, config, uniforms=uniforms)
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    shuffled = sample(model, tokenizer, [prompts[i] for i in order], SamplingConfig(max_new_tokens=10, batch_size=3),
                      uniforms=row_uniforms([keys[i] for i in order], 10))
    assert [shuffled.completion_ids[order.index(i)] for i in range(8)] == whole.completion_ids
    alone = sample(model, tokenizer, prompts[6:7], config, uniforms=row_uniforms(keys[6:7], 10))
    assert alone.completion_ids == whole.completion_ids[6:7]
    # Other keys, other draws (the numbers are what decides, not the generator's position).
    other = sample(model, tokenizer, prompts, config, uniforms=row_uniforms([(1, i, 0) for i in range(8)], 10))
    assert other.completion_ids != whole.completion_ids
    assert row_uniforms(keys[:2], 4).equal(row_uniforms(keys[:2], 4))


def test_shards_are_whole_batches_that_partition_the_prompts():
    config = RolloutConfig(samples_per_prompt=4, batch_size=16)
    assert prompts_per_batch(config) == 4
    for n_shards in (1, 2, 3, 5):
        shards = [shard_prompts(18, config, n_shards, k) for k in range(n_shards)]
        assert sorted(i for s in shards for i in s) == list(range(18))
        for k, shard in enumerate(shards):
            assert all((i // 4) % n_shards == k for i in shard)
    assert shard_prompts(18, config, 1, 0) == list(range(18))
    with pytest.raises(ValueError, match="shard 2"):
        shard_prompts(18, config, 2, 2)


@pytest.mark.parametrize("n_shards", [2, 3])
def test_merged_shards_equal_the_unsharded_rollouts(lm, n_shards):
    model, tokenizer = lm
    prompts = _prompts(10)
    config = RolloutConfig(samples_per_prompt=3, max_new_tokens=8, batch_size=6, seed=5)
    unsharded = merge_shards([sample_rollouts(model, tokenizer, prompts, config)], 10, 3)
    parts = []
    for shard in reversed(range(n_shards)):           # any order
        positions = shard_prompts(10, config, n_shards, shard)
        parts.append(sample_rollouts(model, tokenizer, prompts.iloc[positions], config, positions=positions))
    merged = merge_shards(parts, 10, 3)
    pd.testing.assert_frame_equal(merged, unsharded, check_exact=True)
    assert "prompt_pos" not in merged and merged.completion_ids.map(len).sum() > 0
    with pytest.raises(ValueError, match="missing"):
        merge_shards(parts[1:], 10, 3)
    with pytest.raises(ValueError, match="duplicated"):
        merge_shards(parts + parts[:1], 10, 3)


# ------------------------------------------------------------- through Dagster (smoke profile)


def _read_rollouts(data) -> pd.DataFrame:
    return pd.read_parquet(data / "rollouts" / "rollouts.parquet")


def test_lineage_has_every_shard_md5_and_the_merged_md5(smoke_world):
    import json

    import duckdb

    from assets.rollouts import SHARD_KEYS
    from models.artifacts import dvc_md5

    data, run_id = smoke_world["data_dir"], smoke_world["result"].run_id
    assert SHARD_KEYS == ["0", "1"]                    # the smoke profile's rollouts.shards
    con = duckdb.connect(str(data / "metrics.duckdb"), read_only=True)
    try:
        rows = {a: (json.loads(i), md5, json.loads(p)) for a, i, md5, p in con.execute(
            "SELECT asset, inputs, output_md5, params FROM lineage WHERE run_id = ?", [run_id]).fetchall()}
    finally:
        con.close()
    merged_inputs, merged_md5, _ = rows["rollouts"]
    assert merged_md5 == dvc_md5(data / "rollouts")
    for shard in SHARD_KEYS:
        md5 = dvc_md5(data / "rollout_shards" / shard)
        assert merged_inputs[f"rollout_shards/{shard}"] == md5 == rows[f"rollout_shards/{shard}"][1]
        assert rows[f"rollout_shards/{shard}"][2]["shard"] == int(shard)
    assert rows["rollout_shards"][1] == dvc_md5(data / "rollout_shards")
    # Each shard is its own partition's materialization; the merge's metadata lists the shards' md5s.
    events = smoke_world["result"].get_asset_materialization_events()
    partitions = sorted(e.event_specific_data.materialization.partition for e in events
                        if e.asset_key.to_user_string() == "rollout_shards")
    assert partitions == SHARD_KEYS
    merge = next(e.event_specific_data.materialization for e in events if e.asset_key.to_user_string() == "rollouts")
    assert merge.metadata["shard_md5s"].value == {s: merged_inputs[f"rollout_shards/{s}"] for s in SHARD_KEYS}
    assert merge.metadata["dvc_md5"].value == merged_md5


def test_two_shards_equal_one_row_for_row(smoke_world, tmp_path):
    """The rollouts the smoke graph merged from 2 shards are those of one unsharded sample of the
    whole train split with the same seed: token ids, log-probs and every score."""
    from models.data.rollouts import score_rollouts
    from models.lm.lm import load_frozen_base
    from models.profiles import config_from, load_profile
    from models.rewards.reward_model import load_reward_models
    from models.rewards.rewards import GOLD_REWARDS

    data = smoke_world["data_dir"]
    profile = load_profile("smoke")
    config = config_from(RolloutConfig, {"seed": profile["seed"], **profile["rollouts"]}, ignore=("shards",))
    model, tokenizer, _ = load_frozen_base(data / "base_model", device="cpu")
    prompts = pd.read_parquet(data / "prompts" / "prompts.parquet")
    train = prompts[prompts.split == "train"].reset_index(drop=True)
    one = merge_shards([sample_rollouts(model, tokenizer, train, config)], len(train), config.samples_per_prompt)
    scorers = load_reward_models(data / "reward_models")
    # Through parquet, as the asset stores it (list columns come back as arrays).
    score_rollouts(one, scorers, [a for a in scorers if a in GOLD_REWARDS]).to_parquet(tmp_path / "one.parquet")
    one, two = pd.read_parquet(tmp_path / "one.parquet"), _read_rollouts(data)
    assert len(set(shard_prompts(len(train), config, 2, 0))) and len(set(shard_prompts(len(train), config, 2, 1)))
    pd.testing.assert_frame_equal(two, one, check_exact=True)


def test_shards_in_reverse_order_merge_to_the_same_rollouts(smoke_world, tmp_path):
    import dagster as dg

    from assets.common import FORCE_TAG
    from assets.resources import VasSettings, build_resources
    from models.artifacts import dvc_md5
    from orchestration.definitions import ALL_ASSETS, ALL_CHECKS

    data = tmp_path / "data"
    shutil.copytree(smoke_world["data_dir"], data)
    before, shard_md5s = _read_rollouts(data), {s: dvc_md5(data / "rollout_shards" / s) for s in ("0", "1")}
    shutil.rmtree(data / "rollout_shards")
    shutil.rmtree(data / "rollouts")
    resources = build_resources(VasSettings(profile="smoke", data_dir=str(data), device="cpu"))
    instance = dg.DagsterInstance.ephemeral()
    for shard in ("1", "0"):                       # one run per shard, as separate workers would
        result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets("rollout_shards"),
                                partition_key=shard, resources=resources, instance=instance, tags={FORCE_TAG: "true"})
        assert result.success
        (event,) = result.get_asset_materialization_events()
        assert event.event_specific_data.materialization.partition == shard
    assert {s: dvc_md5(data / "rollout_shards" / s) for s in ("0", "1")} == shard_md5s
    # A merge with a shard missing fails, naming it.
    merged = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets("rollouts"),
                            resources=resources, instance=instance)
    assert merged.success
    pd.testing.assert_frame_equal(_read_rollouts(data), before, check_exact=True)
    shutil.rmtree(data / "rollout_shards" / "1")
    failed = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets("rollouts"),
                            resources=resources, instance=instance, raise_on_error=False, tags={FORCE_TAG: "true"})
    assert not failed.success
    errors = [str(e.event_specific_data.error) for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    assert any("shard 1: not materialized" in e for e in errors), errors
    assert np.array_equal(_read_rollouts(data).n_tokens, before.n_tokens)   # the failed merge wrote nothing
