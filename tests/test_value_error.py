"""Value error against Monte-Carlo estimates: the MC targets, the id-based sampler, the metrics
(an oracle scores mse 0 and Spearman 1, its negation Spearman -1), skipped states, bad input."""

import math
import types

import numpy as np
import pandas as pd
import pytest
import torch

from models.evaluation.value_error import (
    ScoredModel,
    ValueErrorConfig,
    continuation_texts,
    draw_states,
    evaluate_value_error,
    mc_statistics,
    rank_correlation,
    sample_from_ids,
    score_rewards,
    soft_target,
    spearman_ceiling,
    top_candidates,
)
from models.lm.sampling import SamplingConfig, encode_prompts, sample

PROMPTS = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(6)],
                        "prompt": ["a b", "c", "d e f", "b", "a a", "f c"]})


@pytest.fixture(scope="module")
def small(tiny_gpt2, word_tokenizer):
    """V = 8: a word-level tokenizer and a random base model; the reward counts words."""
    vocab = {"<eos>": 0, "<pad>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "e": 6, "f": 7}
    tokenizer = word_tokenizer(vocab, bos="<eos>", padding_side="left")
    base = tiny_gpt2(8, seed=3, init=0.4, eos=0, pad=1)

    def reward(prompts, completions):
        """More `a`s is better, `b`s are bad: a hand-made learned reward."""
        return [c.split().count("a") - 0.5 * c.split().count("b") for c in completions]

    return types.SimpleNamespace(base=base, tokenizer=tokenizer, scorers={"count": reward})


class Oracle:
    """A fake value model that knows the MC targets: start/candidate_q/advance over id prefixes."""

    is_distributional = True

    def __init__(self, pairs: pd.DataFrame, sign: float = 1.0):
        self.values = {(tuple(r["prefix_ids"]), r["candidate_id"]): r for r in pairs.to_dict("records")}
        self.sign = sign

    def start(self, ids, mask):
        return [tuple(row[m.bool()].tolist()) for row, m in zip(ids.cpu(), mask.cpu())]

    def candidate_q(self, state, candidates, beta=None):
        column = "mc_mean" if beta is None else f"mc_{soft_target(beta)}"
        return torch.tensor([[self.sign * self.values[(prefix, a)][column] for a in row]
                             for prefix, row in zip(state, candidates.tolist())], dtype=torch.float64)

    def advance(self, state, tokens):
        raise AssertionError("not needed: every state is encoded from scratch")


class Constant(Oracle):
    is_distributional = False

    def __init__(self):
        pass

    def candidate_q(self, state, candidates, beta=None):
        return torch.zeros(candidates.shape)


CONFIG = ValueErrorConfig(n_prompts=4, prefix_lengths=(0, 2), n_candidates=4, n_continuations=8,
                          betas=(1e-4, 2.0), max_new_tokens=6, seed=0, batch_size=16)


def run(small, models, config=CONFIG):
    return evaluate_value_error(small.base, small.tokenizer, PROMPTS, small.scorers, models, config)


def test_soft_value_is_between_mean_and_max_and_tends_to_the_mean():
    rewards = np.random.default_rng(0).normal(size=(5, 64))
    stats = mc_statistics(rewards, [1e-6, 1.0, 50.0])
    mean = rewards.mean(1)
    assert np.allclose(stats["mc_mean"], mean)
    assert np.allclose(stats["mc_se_mean"], rewards.std(1, ddof=1) / 8)
    assert np.allclose(stats[f"mc_{soft_target(1e-6)}"], mean, atol=1e-5)
    assert (stats[f"mc_{soft_target(1.0)}"] > mean).all()                     # Jensen
    assert np.allclose(stats[f"mc_{soft_target(50.0)}"], rewards.max(1), atol=0.1)
    # Exact rewards (one value repeated): every target is that value, with no noise.
    flat = mc_statistics(np.full((2, 4), 0.3), [2.0])
    assert np.allclose(flat[f"mc_{soft_target(2.0)}"], 0.3) and np.allclose(flat["mc_se_mean"], 0)


def test_id_sampler_is_the_base_sampler(small):
    """Sampling from id prefixes draws what models.lm.sampling draws from the same prompts and seed."""
    prompts = PROMPTS.prompt.tolist()
    gen = sample(small.base, small.tokenizer, prompts, SamplingConfig(max_new_tokens=7, seed=5))
    generator = torch.Generator().manual_seed(5)
    ids = sample_from_ids(small.base, encode_prompts(small.tokenizer, prompts), [7] * len(prompts), 0, 1, generator)
    assert ids == gen.completion_ids
    short = sample_from_ids(small.base, encode_prompts(small.tokenizer, prompts), [2, 0, 1, 2, 0, 3], 0, 1,
                            torch.Generator().manual_seed(5))
    assert [len(c) <= b for c, b in zip(short, [2, 0, 1, 2, 0, 3])] == [True] * 6 and short[1] == short[4] == []


def test_mc_soft_value_at_tiny_beta_approaches_the_mc_mean(small):
    _, pairs = run(small, [ScoredModel("zero", Constant(), "count", "scalar")])
    tiny = pairs[f"mc_{soft_target(1e-4)}"]
    assert np.allclose(tiny, pairs.mc_mean, atol=1e-3)
    assert (pairs[f"mc_{soft_target(2.0)}"] >= pairs.mc_mean - 1e-12).all()
    # Ending the completion is exact: the EOS candidate's continuations are all empty.
    eos = pairs[pairs.is_eos]
    assert len(eos) and (eos.mc_se_mean == 0).all()


def test_oracle_scores_zero_error_and_perfect_ranking(small):
    stats = {"mean": 0.5, "std": 2.0}
    _, truth = run(small, [ScoredModel("zero", Constant(), "count", "scalar", stats)])
    # The standardized targets: (count - 0.5) / 2.
    assert truth.mc_mean.min() < truth.mc_mean.max()
    models = [ScoredModel("oracle", Oracle(truth), "count", "distributional", stats),
              ScoredModel("negated", Oracle(truth, sign=-1.0), "count", "distributional", stats),
              ScoredModel("zero", Constant(), "count", "scalar", stats)]
    metrics, pairs = run(small, models)
    metrics = metrics.set_index(["model", "target"])
    assert set(metrics.index.get_level_values("target")) == {"mean", soft_target(1e-4), soft_target(2.0)}
    for target in ("mean", soft_target(2.0)):
        assert metrics.loc[("oracle", target), "mse"] < 1e-10
        assert metrics.loc[("oracle", target), "spearman"] == pytest.approx(1.0)
        assert metrics.loc[("negated", target), "spearman"] == pytest.approx(-1.0)
        assert metrics.loc[("zero", target), "spearman"] == 0.0    # a constant ranks nothing
    zero = metrics.loc[("zero", "mean")]
    assert zero.mse == pytest.approx(float((truth.mc_mean ** 2).mean()))
    # The noise floor: the mean squared standard error of the MC means.
    assert zero.mc_noise_mse == pytest.approx(float((truth.mc_se_mean ** 2).mean()))
    assert zero.n_pairs == len(truth) and zero.n_states == truth.state_id.nunique()
    assert zero.n_pairs == zero.n_states * CONFIG.n_candidates
    # A non-distributional model's soft estimate is its mean: the point of measuring it.
    z = pairs[pairs.model == "zero"]
    assert (z[f"est_{soft_target(2.0)}"] == z.est_mean).all()


def test_states_shorter_than_the_prefix_are_skipped(small):
    config = ValueErrorConfig(n_prompts=6, prefix_lengths=(0, 3, 5, 6, 50), max_new_tokens=6, seed=2)
    states = draw_states(small.base, small.tokenizer, PROMPTS, config)
    gen = sample(small.base, small.tokenizer, PROMPTS.prompt.tolist(), SamplingConfig(max_new_tokens=6, seed=2))
    by_prompt = {}
    for s in states:
        by_prompt.setdefault(s.prompt_id, []).append(s.prefix_len)
        assert s.ids[:len(s.prompt_ids)] == encode_prompts(small.tokenizer, [s.prompt])[0]
    for pid, completion in zip(PROMPTS.prompt_id, gen.completion_ids):
        # L = 6 leaves no room for an action within max_new_tokens = 6; L = 50 is never reached.
        expected = [length for length in (0, 3, 5) if length <= len(completion)]
        assert by_prompt.get(pid, []) == expected
        for s in states:
            if s.prompt_id == pid:
                assert s.completion_prefix == completion[:s.prefix_len]
    assert any(len(c) < 5 for c in gen.completion_ids), "the test needs a completion that is too short"


def test_bad_input_is_refused_with_a_clear_message(small):
    zero = [ScoredModel("zero", Constant(), "count", "scalar")]
    with pytest.raises(ValueError, match="n_continuations must be >= 2"):
        run(small, zero, ValueErrorConfig(n_continuations=1))
    with pytest.raises(ValueError, match="betas must be > 0"):
        run(small, zero, ValueErrorConfig(betas=(0.0,)))
    with pytest.raises(ValueError, match="no learned reward model for attribute"):
        run(small, [ScoredModel("zero", Constant(), "positivity", "scalar")], CONFIG)


def test_rank_correlation_is_spearman():
    x = pd.Series([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(x, x ** 3) == pytest.approx(1.0)
    assert rank_correlation(x, -np.exp(x)) == pytest.approx(-1.0)
    assert rank_correlation(x, pd.Series([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)
    assert rank_correlation(x, pd.Series([0.0] * 4)) == 0.0
    assert not math.isnan(rank_correlation(x, pd.Series([1.0, 1.0, 2.0, 2.0])))


def ceiling_pairs(spread: float, se: float, states: int = 64, candidates: int = 8, seed: int = 1) -> pd.DataFrame:
    """MC means of `states` x `candidates` pairs whose true values spread by `spread` (sd) within a
    state and are measured with noise of standard error `se`."""
    rng = np.random.default_rng(seed)
    exact = rng.normal(size=(states, 1)) + spread * rng.normal(size=(states, candidates))
    measured = exact + se * rng.normal(size=exact.shape)
    return pd.DataFrame({"state_id": np.repeat(np.arange(states), candidates), "mc_mean": measured.ravel(),
                         "mc_se_mean": se, "exact": exact.ravel()})


def test_the_spearman_ceiling_is_what_an_exact_model_gets_against_noisy_targets():
    # Noiseless targets: an exact model ranks them perfectly.
    assert spearman_ceiling(ceiling_pairs(1.0, 0.0), "mc_mean", "mc_se_mean") == pytest.approx(1.0)
    # All spread is noise (no true spread): nothing to rank. Estimated, the share of spread that is
    # not noise comes out a little above 0 by chance, and the ceiling with it (clipped at 0 below).
    assert 0.0 <= spearman_ceiling(ceiling_pairs(0.0, 1.0, states=400), "mc_mean", "mc_se_mean") < 0.2
    # In between it matches the exact model's own Spearman against these very targets (a few
    # hundredths of noise between one sample of states and the estimate), and it falls with the noise.
    found = []
    for se in (0.3, 1.0, 2.0):
        pairs = ceiling_pairs(1.0, se, states=400)
        ceiling = spearman_ceiling(pairs, "mc_mean", "mc_se_mean")
        exact_model = np.mean([rank_correlation(g.mc_mean, g.exact) for _, g in pairs.groupby("state_id")])
        assert ceiling == pytest.approx(exact_model, abs=0.05)
        found.append(ceiling)
    assert found[0] > found[1] > found[2] > 0.1
    # Ragged states are refused (nan), not silently misaligned.
    ragged = ceiling_pairs(1.0, 0.5).iloc[:-1]
    assert math.isnan(spearman_ceiling(ragged, "mc_mean", "mc_se_mean"))


def test_real_value_models_are_measured(small, tmp_path):
    """ValueModel through the decode interface: scalar ignores beta, distributional does not."""
    from models.value.value_model import ValueModel

    small.base.save_pretrained(tmp_path)
    models = []
    for parameterization in ("scalar", "distributional"):
        model = ValueModel.from_base(tmp_path, parameterization)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen) * 0.3)
        models.append(ScoredModel(parameterization, model.eval(), "count", parameterization))
    metrics, pairs = run(small, models)
    assert len(metrics) == 2 * 3 and np.isfinite(metrics.mse).all()
    scalar, dist = pairs[pairs.model == "scalar"], pairs[pairs.model == "distributional"]
    assert (scalar[f"est_{soft_target(2.0)}"] == scalar.est_mean).all()
    assert not np.allclose(dist[f"est_{soft_target(2.0)}"], dist.est_mean)
    assert np.allclose(dist[f"est_{soft_target(1e-4)}"], dist.est_mean, atol=1e-3)


def test_calibrated_models_are_measured_in_their_own_normal_scores(small, tmp_path):
    """A model with calibrated bins also gets the `calibrated` target: the MC mean of the normal
    scores of the continuations' rewards through its own calibration map, against its calibrated
    decoder's values. Models without calibrated bins have no such row."""
    from models.value.distributional import calibrated_support
    from models.value.value_model import ValueModel

    small.base.save_pretrained(tmp_path)
    stats = {"mean": 0.5, "std": 2.0}
    support, _ = calibrated_support(list(np.linspace(-1.0, 2.0, 50) ** 3), n_bins=9)
    model = ValueModel.from_base(tmp_path, "distributional", support=support)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    models = [ScoredModel("calibrated", model.eval(), "count", "distributional", stats),
              ScoredModel("zero", Constant(), "count", "scalar", stats)]
    metrics, pairs = run(small, models)
    targets = metrics.groupby("model").target.apply(set)
    assert targets["calibrated"] == {"mean", soft_target(1e-4), soft_target(2.0), "calibrated"}
    assert targets["zero"] == {"mean", soft_target(1e-4), soft_target(2.0)}
    assert pairs[pairs.model == "zero"].mc_calibrated.isna().all()

    ours = pairs[pairs.model == "calibrated"]
    # By hand: the same seeded continuations' rewards, standardized, through the map, averaged.
    states = draw_states(small.base, small.tokenizer, PROMPTS, CONFIG)
    candidates, _ = top_candidates(small.base, states, CONFIG.n_candidates, 1, CONFIG.batch_size)
    texts = continuation_texts(small.base, small.tokenizer, states, candidates, CONFIG)
    standardized = (score_rewards(small.scorers["count"], states, candidates.shape[1], texts) - 0.5) / 2.0
    np.testing.assert_allclose(ours.mc_mean, standardized.mean(1))
    scores = np.interp(standardized, support.knot_rewards, support.knot_scores)
    np.testing.assert_allclose(ours.mc_calibrated, scores.mean(1))
    assert not np.allclose(ours.mc_calibrated, ours.mc_mean)
    first = ours.iloc[0]
    # The estimate is the calibrated decoder's value, not the reward's.
    ids, mask = torch.tensor([first.prefix_ids]), torch.ones(1, len(first.prefix_ids), dtype=torch.long)
    state = model.start(ids, mask)
    want = model.candidate_q(state, torch.tensor([[first.candidate_id]]), calibrated=True)
    assert first.est_calibrated == pytest.approx(float(want), abs=1e-6)
    assert not np.allclose(ours.est_calibrated, ours.est_mean)
    row = metrics.set_index(["model", "target"]).loc[("calibrated", "calibrated")]
    assert row.mse == pytest.approx(float(((ours.est_calibrated - ours.mc_calibrated) ** 2).mean()))
