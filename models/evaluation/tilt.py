"""The exact tilt, estimated from Best-of-N's pool: what a VAS decoder with exact values would reach.

Soft VAS with exact soft values samples pi_beta(y) = pi0(y) · exp(beta · R(y)) / Z, the policy with
the highest expected reward of any policy at its KL to pi0. Best-of-N already draws N pi0 samples
per prompt and scores them, so the tilt's reward and KL can be read off that pool for free by
self-normalized importance sampling: per prompt, weights w_j = exp(beta · R_j) / sum_i exp(beta · R_i)
over the N samples, E_beta[f] ~ sum_j w_j · f_j and KL(pi_beta || pi0) ~ sum_j w_j · log(N · w_j).

This is a reference curve, not a decoder: the estimate is biased low in KL once the weights
concentrate (it cannot exceed log N), so every point carries its effective sample size
1 / sum_j w_j^2 (N when beta = 0, 1 when one sample takes all the weight). Where the curve lies
against Best-of-N's says how much room the value estimate has: a VAS decoder can at best reach it.
beta is per standard deviation of the pool's learned reward (soft VAS's beta is per standard
deviation of the rollouts' rewards: close, not equal).
"""

from __future__ import annotations

import json
import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from models.evaluation.study import mean_ci95

FAMILY = "exact tilt (estimate)"


def tilt_weights(rewards: np.ndarray, beta: float) -> np.ndarray:
    """rewards (S, N) -> self-normalized weights (S, N) of exp(beta · R) over each row."""
    logits = beta * np.asarray(rewards, dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)                                   # exp cannot overflow
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def tilt_curve(learned: np.ndarray, betas: Sequence[float], attribute: str,
               scores: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """learned (S, N): the reward tilted by, for S prompt draws x N pi0 samples; scores: more
    (S, N) columns to average under the tilt (named as in evaluation summaries, e.g.
    gold_positivity). One row per beta, shaped like an evaluation summary row (method "tilt"):
    kl_nats_mean, <column>_mean and _ci95 (over the S prompt draws), ess_mean."""
    learned = np.asarray(learned, dtype=np.float64)
    if learned.ndim != 2 or learned.shape[1] < 2:
        raise ValueError(f"the tilt needs (prompt draws, pool samples >= 2) rewards, got shape {learned.shape}")
    if not np.isfinite(learned).all():
        raise ValueError("the tilt's rewards must be finite")
    scale = learned.std() or 1.0          # all rewards equal: every tilt is pi0 itself
    columns = {f"learned_{attribute}": learned, **{k: np.asarray(v, dtype=np.float64) for k, v in (scores or {}).items()}}
    for name, values in columns.items():
        if values.shape != learned.shape:
            raise ValueError(f"{name} has shape {values.shape}, the rewards {learned.shape}")
    n = learned.shape[1]
    rows = []
    for beta in betas:
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"tilt betas must be finite and >= 0, got {beta}")
        w = tilt_weights(learned / scale, beta)                                   # (S, N)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(w > 0, w * np.log(n * w), 0.0).sum(1)                   # (S,)
        params = {"attribute": attribute, "beta": float(beta)}
        row = {"method": "tilt", "params": json.dumps(params, sort_keys=True), "family": FAMILY,
               "n_samples": len(learned), "param_beta": float(beta), "param_attribute": attribute,
               "kl_nats_mean": float(kl.mean()), "ess_mean": float((1.0 / (w ** 2).sum(1)).mean())}
        for name, values in columns.items():
            row[f"{name}_mean"], row[f"{name}_ci95"] = mean_ci95((w * values).sum(1))
        rows.append(row)
    return pd.DataFrame(rows)
