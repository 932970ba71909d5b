import math

import numpy as np
import pytest

from models.data.preferences import bradley_terry_prob, label_pairs
from models.profiles import load_profile, resolve
from models.rewards.rewards import conciseness, count_words, gold_reward, positivity, score_gold


def test_positivity_orders_sentiment():
    glowing, harsh = positivity(["The sound is amazing. Love it!", "The battery is terrible. Returning it."])
    assert glowing > 0.5 and harsh < -0.3


def test_conciseness_is_bounded_and_prefers_short():
    short, long_, empty = conciseness(["Works.", " ".join(["word"] * 200), ""])
    assert short == pytest.approx(1 - 1 / 60)
    assert long_ == 0.0
    assert empty == 1.0


def test_registry_rejects_unknown_attribute():
    with pytest.raises(KeyError, match="helpfulness"):
        gold_reward("helpfulness")
    assert set(score_gold(["ok"], ["positivity", "conciseness"])) == {"positivity", "conciseness"}


def test_count_words_handles_punctuation():
    assert count_words("I don't like it, at all.") == 6


def test_bradley_terry_probability_by_hand():
    assert bradley_terry_prob(0.5, 0.5, 0.1) == 0.5
    assert bradley_terry_prob(0.3, 0.1, 0.1) == pytest.approx(1 / (1 + math.exp(-2)))
    assert bradley_terry_prob(-1.0, 1.0, 0.1) == pytest.approx(1 / (1 + math.exp(20)))
    with pytest.raises(ValueError):
        bradley_terry_prob(0, 0, 0)


def test_bt_labels_follow_the_gold_reward_with_noise():
    # "Works." is always more concise than the long text: P(a chosen) = sigmoid(diff / scale).
    a = ["Works."] * 4000
    b = ["This thing works pretty well for me most days."] * 4000
    diff = conciseness(a[:1])[0] - conciseness(b[:1])[0]
    chosen, r_a, r_b = label_pairs(a, b, "conciseness", 0.1, np.random.default_rng(0))
    expected = 1 / (1 + math.exp(-diff / 0.1))
    assert np.mean(chosen) == pytest.approx(expected, abs=0.03)
    assert 0.6 < expected < 0.95  # noisy but informative


def test_smoke_profile_overlays_default():
    default, smoke = load_profile("default"), load_profile("smoke")
    assert smoke["base_model"]["n_layer"] < default["base_model"]["n_layer"]
    # Keys the smoke profile does not set come from default.
    assert smoke["base_model"]["learning_rate"] == default["base_model"]["learning_rate"]
    assert smoke["preference_pairs"]["attributes"] == ["positivity", "conciseness"]


def test_resolve_applies_overrides_and_rejects_unknown_keys():
    profile = load_profile("smoke")
    params = resolve(profile, "corpus", {"n_reviews": 7, "unused": None})
    assert params == {"seed": profile["seed"], "n_reviews": 7}
    with pytest.raises(KeyError, match="corpus.bogus"):
        resolve(profile, "corpus", {"bogus": 1})
    with pytest.raises(KeyError, match="unknown profile"):
        load_profile("nope")
