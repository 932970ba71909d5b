"""TD(lambda) targets for a value model of the frozen base policy.

Indexing: a rollout's completion tokens are actions a_1..a_n (EOS included when the sample
ended), and u_j is the model's value of the state reached by taking a_j (V(s_j) for the scalar
head, Q(s_{j-1}, a_j) for the Q head). The reward R arrives at the end only, so

    y_n = R
    y_j = gamma * ((1 - lambda) * u_{j+1} + lambda * y_{j+1})      for j < n

lambda = 1 gives Monte-Carlo targets (y_j = gamma^(n-j) R); lambda = 0 gives TD(0).
"""

from __future__ import annotations

import torch


def lambda_returns(values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor,
                   lam: float = 0.95, gamma: float = 1.0) -> torch.Tensor:
    """values (B, T, *E) at action positions, rewards (B, *E), action_mask (B, T) -> targets (B, T, *E).

    Action positions need not be contiguous or aligned across rows (left or right padding);
    targets are 0 where action_mask is 0. Values should come from a frozen copy of V (detached).
    Trailing dims E are carried along: scalar values have none, histograms (the distributional
    head, models/value/distributional.py) have one.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    trailing = (1,) * (values.dim() - 2)                            # broadcast (B,) masks over E
    mask = action_mask.bool().reshape(*action_mask.shape, *trailing)
    values = values.detach().float()
    rewards = rewards.float()
    targets = torch.zeros_like(values)
    next_value = torch.zeros_like(rewards)                          # u_{j+1}
    next_target = torch.zeros_like(next_value)                      # y_{j+1}
    seen_later = torch.zeros_like(mask[:, 0])                       # has this row an action after t?
    for t in range(values.shape[1] - 1, -1, -1):
        bootstrapped = gamma * ((1 - lam) * next_value + lam * next_target)
        y = torch.where(seen_later, bootstrapped, rewards)
        active = mask[:, t]
        targets[:, t] = torch.where(active, y, 0.0)
        next_value = torch.where(active, values[:, t], next_value)
        next_target = torch.where(active, y, next_target)
        seen_later = seen_later | active
    return targets


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    return ((pred.float() - target) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)
