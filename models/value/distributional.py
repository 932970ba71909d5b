"""Distributional values: a histogram over reward bins, HL-Gauss targets and soft values.

A distributional value model predicts, for a prefix, the distribution of the terminal reward R
that pi0 reaches from it, as a histogram over fixed bins. That gives both

- the mean value E[R | s], the paper's VAS, and
- the soft value Q_beta = (1/beta) · log E[exp(beta · R) | s], for any beta chosen at decode time.

Sampling pi0(a|s) · exp(beta · Q_beta(s, a)) token by token is exactly the sequence-level tilt
pi0(y) · exp(beta · R(y)) / Z, because exp(beta · Q_beta(s, a)) = Z(s·a) is the normalizer of the
tilted continuations. exp(beta · E[R]) instead under-weights continuations whose reward is
uncertain but sometimes high (Jensen).

Calibrated bins. Learned rewards saturate: here the top tenth of pi0's rewards lies within 0.1
standard deviations, where Best-of-N does all its selecting, so uniform bins put it in one or two
bins and no value of R can tell the 99th percentile from the 90th. With `calibrated` bins the
histogram is over the normal score z = Phi^-1(F(R)) of the reward, F the empirical CDF of pi0's
rewards (the calibrated reward of InfAlign, Balashankar et al. 2024): every quantile gets equal
resolution. Each bin also keeps the reward at its centre (`bin_values`, F^-1(Phi(z))), so the
same histogram still gives the mean and soft value of R; `calibrated=True` asks for those of z
instead, which tilt by pi0-quantile as Best-of-N does.

Training targets are HL-Gauss histograms (Farebrother et al. 2024, "Stop Regressing"): the mass a
Gaussian centred on the target puts on each bin, sigma = 0.75 bin widths, fitted by
cross-entropy. With gamma = 1 and a terminal reward only, the TD(lambda) target at step j is the
mixture (1 - lambda) · p(s_{j+1}) + lambda · target_{j+1}, ending at the histogram of R.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.value.td import lambda_returns


@dataclass(frozen=True)
class Support:
    """n_bins equal bins over [v_min, v_max], in standardized reward units."""

    v_min: float = -4.0
    v_max: float = 4.0
    n_bins: int = 41
    sigma_ratio: float = 0.75          # HL-Gauss sigma in bin widths (the paper's recommendation)
    # Calibrated bins: the centres are normal scores z of the reward and bin_values the reward
    # (standardized units) at each centre, non-decreasing. None: the centres are rewards.
    bin_values: tuple[float, ...] | None = None
    # The calibration map itself, reward -> normal score, at up to MAX_KNOTS of the training rewards
    # (increasing): what maps new rewards into these units (a value model trained further).
    knot_rewards: tuple[float, ...] | None = None
    knot_scores: tuple[float, ...] | None = None

    def __post_init__(self):
        if not self.v_max > self.v_min:
            raise ValueError(f"support needs v_max > v_min, got [{self.v_min}, {self.v_max}]")
        if self.n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins}")
        if self.bin_values is not None:
            values = tuple(float(v) for v in self.bin_values)
            if len(values) != self.n_bins:
                raise ValueError(f"bin_values needs one value per bin ({self.n_bins}), got {len(values)}")
            if any(b < a for a, b in zip(values, values[1:])):
                raise ValueError("bin_values must be non-decreasing: a calibration map is monotone")
            object.__setattr__(self, "bin_values", values)
        if (self.knot_rewards is None) != (self.knot_scores is None):
            raise ValueError("knot_rewards and knot_scores come together")
        if self.knot_rewards is not None:
            rewards, scores = (tuple(float(v) for v in k) for k in (self.knot_rewards, self.knot_scores))
            if len(rewards) != len(scores) or any(b <= a for a, b in zip(rewards, rewards[1:])):
                raise ValueError("knot_rewards must increase strictly, with one knot_score each")
            object.__setattr__(self, "knot_rewards", rewards)
            object.__setattr__(self, "knot_scores", scores)

    @property
    def calibrated(self) -> bool:
        return self.bin_values is not None

    def normal_scores_of(self, rewards) -> np.ndarray:
        """New rewards in this support's calibrated units: the training rewards' calibration map,
        interpolated between its knots, clamped to its ends (no quantile lies beyond pi0's range)."""
        if self.knot_rewards is None:
            raise ValueError("this support has no calibration map (uniform bins, or saved without one)")
        return np.interp(np.asarray(rewards, dtype=np.float64), self.knot_rewards, self.knot_scores)

    @property
    def width(self) -> float:
        return (self.v_max - self.v_min) / self.n_bins

    def centers(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """(n_bins,) bin centres."""
        edges = torch.linspace(self.v_min, self.v_max, self.n_bins + 1, dtype=torch.float64)
        return ((edges[:-1] + edges[1:]) / 2).to(device=device, dtype=dtype)

    def values(self, device=None, dtype=torch.float32, calibrated: bool = False) -> torch.Tensor:
        """(n_bins,) what each bin stands for: the reward, or its normal score when calibrated."""
        if calibrated and not self.calibrated:
            raise ValueError("calibrated values need a value model trained with calibrated bins "
                             "(value_models.calibrated_bins: true)")
        if self.bin_values is None or calibrated:
            return self.centers(device, dtype)
        return torch.tensor(self.bin_values, device=device, dtype=dtype)


def hl_gauss(values: torch.Tensor, support: Support) -> torch.Tensor:
    """values (...) -> histograms (..., n_bins) summing to 1: the mass of N(value, sigma) on each
    bin, renormalized over the support. Values are clamped to the outer bin centres first, so a
    reward beyond the support lands on the edge bin instead of being cut in half. A support padded
    by 3 sigmas beyond the rewards (value_training.support_for) never truncates one."""
    centers = support.centers(values.device, torch.float64)
    y = values.double().clamp(float(centers[0]), float(centers[-1]))[..., None]          # (..., 1)
    sigma = support.sigma_ratio * support.width
    edges = torch.linspace(support.v_min, support.v_max, support.n_bins + 1, dtype=torch.float64,
                           device=values.device)
    cdf = torch.special.ndtr((edges - y) / sigma)                                        # (..., n_bins + 1)
    mass = cdf[..., 1:] - cdf[..., :-1]
    return (mass / mass.sum(-1, keepdim=True)).to(torch.float32)


def mean_value(logits: torch.Tensor, support: Support, calibrated: bool = False) -> torch.Tensor:
    """logits (..., n_bins) -> E[R] (...), or E[z] when calibrated."""
    probs = torch.softmax(logits.float(), -1)
    return (probs * support.values(logits.device, calibrated=calibrated)).sum(-1)


def soft_value(logits: torch.Tensor, support: Support, beta: float, calibrated: bool = False) -> torch.Tensor:
    """logits (..., n_bins) -> Q_beta = (1/beta) · log sum_b p_b · exp(beta · v_b)   (...), v_b the
    reward of bin b (its normal score when calibrated).

    beta = 0 is the limit, the mean. Computed in float64: for small |beta| the log-sum-exp is
    beta · mean + O(beta^2) and float32 would lose the difference."""
    if beta == 0:
        return mean_value(logits, support, calibrated)
    log_p = torch.log_softmax(logits.double(), -1)
    v = support.values(logits.device, torch.float64, calibrated)
    return (torch.logsumexp(log_p + beta * v, -1) / beta).float()


def value_of(logits: torch.Tensor, support: Support, beta: float | None = None,
             calibrated: bool = False) -> torch.Tensor:
    """The mean value (beta None) or the soft value at beta; of the reward, or of its normal score."""
    return mean_value(logits, support, calibrated) if beta is None else soft_value(logits, support, beta, calibrated)


def normal_scores(rewards) -> np.ndarray:
    """Phi^-1((rank - 1/2) / n) of each reward among all of them (ties share their mean rank): the
    calibrated reward, standard normal whatever the rewards' own distribution."""
    rewards = np.asarray(rewards, dtype=np.float64)
    values, inverse, counts = np.unique(rewards, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0                     # 1-based, ties averaged
    quantiles = torch.from_numpy((mean_rank[inverse] - 0.5) / len(rewards))
    return torch.special.ndtri(quantiles).numpy()


MAX_KNOTS = 4096


def calibrated_support(rewards, n_bins: int, sigma_ratio: float = 0.75) -> tuple[Support, np.ndarray]:
    """Bins over the normal scores of `rewards` (padded by 3 HL-Gauss sigmas, as uniform bins are),
    with the reward at each centre from the rewards' empirical quantile function, and the map
    itself at up to MAX_KNOTS distinct rewards (both ends kept). Returns the support and the normal
    scores (the training targets)."""
    z = normal_scores(rewards)
    distinct, first = np.unique(np.asarray(rewards, dtype=np.float64), return_index=True)
    keep = np.unique(np.linspace(0, len(distinct) - 1, min(len(distinct), MAX_KNOTS)).round().astype(int))
    pad = 3 * sigma_ratio
    width = (z.max() - z.min()) / max(n_bins - 2 * pad, 1.0) if z.max() > z.min() else 1.0
    low, high = float(z.min() - pad * width), float(z.max() + pad * width)
    grid = Support(v_min=low, v_max=high, n_bins=n_bins, sigma_ratio=sigma_ratio)
    at_centres = np.quantile(np.asarray(rewards, dtype=np.float64),
                             torch.special.ndtr(grid.centers(dtype=torch.float64)).numpy())
    return Support(v_min=low, v_max=high, n_bins=n_bins, sigma_ratio=sigma_ratio,
                   bin_values=tuple(at_centres.tolist()), knot_rewards=tuple(distinct[keep].tolist()),
                   knot_scores=tuple(z[first[keep]].tolist())), z


def distributional_lambda_returns(probs: torch.Tensor, terminal: torch.Tensor, action_mask: torch.Tensor,
                                  lam: float = 0.95) -> torch.Tensor:
    """probs (B, T, n_bins) of a frozen copy at action positions, terminal (B, n_bins) histograms
    of the rewards, action_mask (B, T) -> target histograms (B, T, n_bins), zero where masked.

    The same recursion as lambda_returns with gamma = 1, on histograms: a mixture of histograms
    is a histogram, so every target sums to 1 (a discount would need the bins to shrink)."""
    return lambda_returns(probs, terminal, action_mask, lam=lam, gamma=1.0)


def histogram_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of -sum_b target_b · log softmax(logits)_b."""
    log_p = torch.log_softmax(logits.float(), -1)
    per_position = -(targets * log_p).sum(-1)                                           # (B, T)
    mask = mask.float()
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0)


def support_from(config: dict) -> Support:
    keys = ("v_min", "v_max", "n_bins", "sigma_ratio", "bin_values", "knot_rewards", "knot_scores")
    return Support(**{k: config[k] for k in keys if config.get(k) is not None})
