"""Distributional values: a histogram over reward bins, HL-Gauss targets and soft values.

A distributional value model predicts, for a prefix, the distribution of the terminal reward R
that pi0 reaches from it, as a histogram over fixed bins. That gives both

- the mean value E[R | s], the paper's VAS, and
- the soft value Q_beta = (1/beta) · log E[exp(beta · R) | s], for any beta chosen at decode time.

Sampling pi0(a|s) · exp(beta · Q_beta(s, a)) token by token is exactly the sequence-level tilt
pi0(y) · exp(beta · R(y)) / Z, because exp(beta · Q_beta(s, a)) = Z(s·a) is the normalizer of the
tilted continuations. exp(beta · E[R]) instead under-weights continuations whose reward is
uncertain but sometimes high (Jensen).

Training targets are HL-Gauss histograms (Farebrother et al. 2024, "Stop Regressing"): the mass a
Gaussian centred on the target puts on each bin, sigma = 0.75 bin widths, fitted by
cross-entropy. With gamma = 1 and a terminal reward only, the TD(lambda) target at step j is the
mixture (1 - lambda) · p(s_{j+1}) + lambda · target_{j+1}, ending at the histogram of R.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.td import lambda_returns


@dataclass(frozen=True)
class Support:
    """n_bins equal bins over [v_min, v_max], in standardized reward units."""

    v_min: float = -4.0
    v_max: float = 4.0
    n_bins: int = 41
    sigma_ratio: float = 0.75          # HL-Gauss sigma in bin widths (the paper's recommendation)

    def __post_init__(self):
        if not self.v_max > self.v_min:
            raise ValueError(f"support needs v_max > v_min, got [{self.v_min}, {self.v_max}]")
        if self.n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins}")

    @property
    def width(self) -> float:
        return (self.v_max - self.v_min) / self.n_bins

    def centers(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """(n_bins,) bin centres."""
        edges = torch.linspace(self.v_min, self.v_max, self.n_bins + 1, dtype=torch.float64)
        return ((edges[:-1] + edges[1:]) / 2).to(device=device, dtype=dtype)


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


def mean_value(logits: torch.Tensor, support: Support) -> torch.Tensor:
    """logits (..., n_bins) -> E[R] (...)."""
    probs = torch.softmax(logits.float(), -1)
    return (probs * support.centers(logits.device)).sum(-1)


def soft_value(logits: torch.Tensor, support: Support, beta: float) -> torch.Tensor:
    """logits (..., n_bins) -> Q_beta = (1/beta) · log sum_b p_b · exp(beta · z_b)   (...).

    beta = 0 is the limit, the mean. Computed in float64: for small |beta| the log-sum-exp is
    beta · mean + O(beta^2) and float32 would lose the difference."""
    if beta == 0:
        return mean_value(logits, support)
    log_p = torch.log_softmax(logits.double(), -1)
    z = support.centers(logits.device, torch.float64)
    return (torch.logsumexp(log_p + beta * z, -1) / beta).float()


def value_of(logits: torch.Tensor, support: Support, beta: float | None = None) -> torch.Tensor:
    """The mean value (beta None) or the soft value at beta."""
    return mean_value(logits, support) if beta is None else soft_value(logits, support, beta)


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
    return Support(**{k: config[k] for k in ("v_min", "v_max", "n_bins", "sigma_ratio") if k in config})
