"""The product's targets on hand-made evaluation summaries, with numbers computed by hand."""

import json
import math

import pandas as pd
import pytest

from models.evaluation.evaluation import family_of
from models.evaluation.targets import check, interpolate, markdown, study_markdown


def row(method, params, gold, learned, kl, forwards, distinct=0.3, ci=0.01):
    return {"method": method, "params": json.dumps(params, sort_keys=True), "family": family_of(method, params),
            "gold_positivity_mean": gold, "gold_positivity_ci95": ci, "learned_positivity_mean": learned,
            "learned_positivity_ci95": ci, "kl_nats_mean": kl, "distinct_2": distinct,
            "base_forwards_per_sample": forwards, **{f"param_{k}": v for k, v in params.items()}}


SOFT = {"attribute": "positivity", "parameterization": "distributional_qhead", "soft": True}


def summary(soft_learned_at_2=1.0, lift_gold=0.58, lift_distinct=0.3, rerank_forwards=100.0):
    # Best-of-N: learned 0 -> 1 -> 1.2 at KL 0, 1, 4 (one point per N, costs 10 per candidate);
    # gold 0.1 -> 0.7 at N = 16 (lift 0.6), cost 160.
    rows = [row("base", {}, 0.1, 0.0, 0.0, 10.0),
            row("bon", {"n": 1}, 0.1, 0.0, 0.0, 10.0),
            row("bon", {"n": 4}, 0.4, 1.0, 1.0, 40.0),
            row("bon", {"n": 16}, 0.7, 1.2, 4.0, 160.0)]
    # Soft VAS along beta: KL 0.5 -> 3, learned 0.6 -> soft_learned_at_2 (at KL 2) -> 1.1.
    rows += [row("vas", {**SOFT, "beta": 2.0}, 0.3, 0.6, 0.5, 9.0),
             row("vas", {**SOFT, "beta": 8.0}, lift_gold, soft_learned_at_2, 2.0, 9.0, distinct=lift_distinct),
             row("vas", {**SOFT, "beta": 16.0}, 0.5, 1.1, 3.0, 9.0)]
    # Scalar VAS: more gold, but 12x the forwards of Best-of-16 / 16.
    rows.append(row("vas", {"attribute": "positivity", "parameterization": "scalar", "beta": 8.0}, 0.69, 1.0, 2.0, 120.0))
    rows += [row("vas_rerank", {**SOFT, "beta": 16.0, "n": 2}, 0.65, 1.15, 3.5, rerank_forwards / 2),
             row("vas_rerank", {**SOFT, "beta": 16.0, "n": 4}, 0.69, 1.25, 4.5, rerank_forwards)]
    return pd.DataFrame(rows)


def test_interpolate_is_piecewise_linear_and_nan_outside():
    assert interpolate([0, 1, 4], [0, 1, 1.3], 2.5) == pytest.approx(1.15)
    assert interpolate([4, 0, 1], [1.3, 0, 1], 0.5) == pytest.approx(0.5)        # unsorted input
    assert math.isnan(interpolate([1, 2], [0, 1], 3.0)) and math.isnan(interpolate([], [], 1.0))


def test_frontier_lift_and_rerank_targets_by_hand():
    result = check(summary())
    at1, at2, at4 = result["frontier"]
    # KL 1: BoN 1.0; soft plain: 0.6 + (1 - 0.6) * 0.5 / 1.5 = 0.7333; the rerank curve starts at KL 3.
    assert at1["bon"] == pytest.approx(1.0) and at1["vas"] == pytest.approx(0.6 + 0.4 / 3)
    assert not at1["met"]                                                           # 0.743 < 0.99
    # KL 2: BoN 1 + 0.2 / 3 = 1.0667; soft 1.0 (+0.01) < 1.0567 -> missed.
    assert at2["bon"] == pytest.approx(1.0 + 0.2 / 3) and at2["vas"] == pytest.approx(1.0) and not at2["met"]
    # KL 4: BoN 1.2; rerank curve (beta 16 at KL 3, n=2 at 3.5, n=4 at 4.5): 1.15 + 0.1 * 0.5 = 1.2 -> met.
    assert at4["vas"] == pytest.approx(1.2) and at4["met"] and "rerank" in at4["decoder"]
    assert not result["frontier_met"]
    # Lift: soft beta 8 has (0.58 - 0.1) / 0.6 = 0.8 of the lift at 9 / 160 forwards; scalar is over 1/16.
    assert result["lift"]["share"] == pytest.approx(0.8) and result["lift"]["cost"] == pytest.approx(9 / 160)
    assert result["lift_any_cost"]["share"] == pytest.approx(0.59 / 0.6) and not result["lift_met"]
    # Rerank: n=4 (100 forwards) and n=2 (50) both cost more than 1/8 of 160 = 20 -> none counts.
    assert result["rerank"]["row"] is None and not result["rerank_met"]
    # n=2 at 20 / 160 counts: (0.65 - 0.1) / 0.6 = 0.917 of the lift, intervals apart from 0.7 -> missed.
    cheap = check(summary(rerank_forwards=40.0))
    assert cheap["rerank"]["share"] == pytest.approx(0.55 / 0.6) and not cheap["rerank_met"]
    # n=4 at 20 / 160: 0.69 ± 0.01 overlaps Best-of-16's 0.7 ± 0.01 -> met.
    cheapest = check(summary(rerank_forwards=20.0))
    assert cheapest["rerank"]["share"] == pytest.approx(0.59 / 0.6) and cheapest["rerank_met"]


def test_targets_met_and_low_diversity_rows_do_not_count():
    result = check(summary(soft_learned_at_2=1.08, lift_gold=0.68))
    assert result["frontier"][1]["met"] and result["lift_met"]                      # 0.58 / 0.6 >= 0.95
    # The same row with distinct-2 below 0.9 x base sampling's (0.3) does not count.
    collapsed = check(summary(soft_learned_at_2=1.08, lift_gold=0.68, lift_distinct=0.2))
    assert collapsed["lift"]["share"] < 0.95 and not collapsed["lift_met"]
    assert not collapsed["frontier"][1]["met"]
    text = markdown(result)
    assert "**met**" in text and "| 2 |" in text


def test_study_counts_seeds_meeting_each_target():
    per_seed = pd.concat([summary().assign(seed=0), summary(soft_learned_at_2=1.08, lift_gold=0.68).assign(seed=1)])
    text = study_markdown(per_seed)
    assert "lift: met in 1 of 2 seeds." in text and "rerank: met in 0 of 2 seeds." in text


def test_exact_tilt_rows_give_each_kl_point_its_room():
    # Tilt rows (models/evaluation/tilt.py): learned 0 -> 1.05 -> 1.1 -> 1.19 at KL 0, 1, 2, 4; not a decoder.
    tilt = [{"method": "tilt", "params": json.dumps({"attribute": "positivity", "beta": b}), "family": "exact tilt",
             "learned_positivity_mean": v, "learned_positivity_ci95": 0.0, "kl_nats_mean": kl, "param_beta": b}
            for b, v, kl in ((0.0, 0.0, 0.0), (2.0, 1.05, 1.0), (8.0, 1.1, 2.0), (64.0, 1.19, 4.0))]
    result = check(pd.concat([summary(), pd.DataFrame(tilt)], ignore_index=True))
    assert [p["tilt"] for p in result["frontier"]] == pytest.approx([1.05, 1.1, 1.19])
    assert [p["met"] for p in result["frontier"]] == [p["met"] for p in check(summary())["frontier"]]
    text = markdown(result)
    # Room above Best-of-N: 1.05 - 1.0, 1.1 - 1.0667, 1.19 - 1.2.
    assert "+0.050 at 1, +0.033 at 2, -0.010 at 4" in text and "| 1 | 1.000 ± 0.010 | 1.050 |" in text
    assert all(math.isnan(p["tilt"]) for p in check(summary())["frontier"])      # no tilt rows: no column value
