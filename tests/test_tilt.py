"""The exact tilt estimated on a Best-of-N pool (models/evaluation/tilt.py), against numbers computed by hand."""

import json
import math

import numpy as np
import pytest

from models.evaluation.tilt import tilt_curve, tilt_weights


def test_beta_zero_is_pi0_itself():
    rewards = np.array([[0.0, 1.0, 2.0], [3.0, 3.0, 6.0]])
    row = tilt_curve(rewards, [0.0], "positivity").iloc[0]
    assert row.kl_nats_mean == pytest.approx(0.0, abs=1e-12)
    assert row.learned_positivity_mean == pytest.approx((1.0 + 4.0) / 2)      # mean of the row means
    assert row.ess_mean == pytest.approx(3.0)
    assert row.method == "tilt" and json.loads(row.params) == {"attribute": "positivity", "beta": 0.0}


def test_two_samples_by_hand():
    # Rewards 0 and 1: sd 0.5, so R / sd is 0 and 2; beta = ln(3) / 2 weights them 1 : 3.
    rewards = np.array([[0.0, 1.0]])
    gold = np.array([[10.0, 20.0]])
    row = tilt_curve(rewards, [math.log(3) / 2], "positivity", {"gold_positivity": gold}).iloc[0]
    assert row.learned_positivity_mean == pytest.approx(0.75)
    assert row.gold_positivity_mean == pytest.approx(0.25 * 10 + 0.75 * 20)
    # KL = sum w log(N w) = 0.25 log 0.5 + 0.75 log 1.5; ESS = 1 / (0.25^2 + 0.75^2) = 1.6.
    assert row.kl_nats_mean == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert row.ess_mean == pytest.approx(1.6)


def test_large_beta_is_the_pool_maximum():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(5, 16))
    row = tilt_curve(rewards, [1e6], "positivity").iloc[0]
    assert row.learned_positivity_mean == pytest.approx(rewards.max(1).mean())
    assert row.kl_nats_mean == pytest.approx(math.log(16)) and row.ess_mean == pytest.approx(1.0)


def test_reward_and_kl_grow_with_beta_and_stay_below_best_of_n():
    rng = np.random.default_rng(1)
    rewards = rng.gamma(2.0, size=(40, 32))
    curve = tilt_curve(rewards, [0, 0.5, 1, 2, 4, 8, 16], "positivity")
    assert np.all(np.diff(curve.learned_positivity_mean) > 0) and np.all(np.diff(curve.kl_nats_mean) > 0)
    assert np.all(np.diff(curve.ess_mean) < 0)
    assert (curve.learned_positivity_mean <= rewards.max(1).mean() + 1e-12).all()   # a weighted mean <= the max
    assert (curve.kl_nats_mean <= math.log(32) + 1e-12).all()


def test_estimate_converges_to_the_analytic_tilt():
    # pi0 over three outcomes with rewards 0, 1, 2; the tilt pi0 · exp(b R) / Z in closed form, at b
    # per sd of the pool's rewards, which a large pool pins down.
    p0, r = np.array([0.5, 0.3, 0.2]), np.array([0.0, 1.0, 2.0])
    rng = np.random.default_rng(2)
    draws = rng.choice(3, size=(1, 200_000), p=p0)
    rewards = r[draws]
    beta = 1.5
    b = beta / rewards.std()
    tilted = p0 * np.exp(b * r)
    tilted /= tilted.sum()
    row = tilt_curve(rewards, [beta], "positivity").iloc[0]
    assert row.learned_positivity_mean == pytest.approx(float((tilted * r).sum()), abs=0.01)
    assert row.kl_nats_mean == pytest.approx(float((tilted * np.log(tilted / p0)).sum()), abs=0.01)


def test_equal_rewards_leave_pi0_and_bad_input_is_refused():
    row = tilt_curve(np.ones((2, 4)), [8.0], "positivity").iloc[0]
    assert row.kl_nats_mean == pytest.approx(0.0) and row.ess_mean == pytest.approx(4.0)
    with pytest.raises(ValueError, match="pool samples >= 2"):
        tilt_curve(np.ones((3, 1)), [1.0], "positivity")
    with pytest.raises(ValueError, match="finite"):
        tilt_curve(np.array([[0.0, np.nan]]), [1.0], "positivity")
    with pytest.raises(ValueError, match=">= 0"):
        tilt_curve(np.array([[0.0, 1.0]]), [-1.0], "positivity")
    with pytest.raises(ValueError, match="gold_positivity has shape"):
        tilt_curve(np.array([[0.0, 1.0]]), [1.0], "positivity", {"gold_positivity": np.zeros((1, 3))})


def test_weights_do_not_overflow():
    w = tilt_weights(np.array([[0.0, 1000.0]]), 10.0)
    assert np.isfinite(w).all() and w[0, 1] == pytest.approx(1.0)
