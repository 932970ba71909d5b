"""Conservative rewards from an ensemble of reward models (Coste et al. 2023, "Reward Model
Ensembles Help Mitigate Overoptimization"): score = mean over members - k · their sd.

A text that only some members like (one member's quirk, which Best-of-N or a large beta would
exploit) is scored down by their disagreement; k = 0 is the mean ensemble, and the worst case
(min over members) is its own objective. Members are scorers with the RewardScorer call signature
(prompts, completions) -> scores, e.g. reward models trained with different seeds (their held-out
splits differ too, so each sees a different sample of the pairs).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Scorer = Callable[[Sequence[str], Sequence[str]], list]
OBJECTIVES = ("mean_minus_sd", "worst_case")


def combine(scores: np.ndarray, k: float = 1.0, objective: str = "mean_minus_sd") -> np.ndarray:
    """(members, n) member scores -> (n,) conservative scores: mean - k·sd (sd over members, ddof=0,
    so identical members give their own score exactly) or the worst case (min over members)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] < 1:
        raise ValueError(f"member scores must be (members, n) with at least one member, got shape {scores.shape}")
    if objective == "worst_case":
        return scores.min(0)
    if objective != "mean_minus_sd":
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if k < 0:
        raise ValueError(f"k must be >= 0 (a bonus for disagreement is not conservative), got {k}")
    return scores.mean(0) - k * scores.std(0)


class EnsembleScorer:
    """A scorer made of member scorers: each scores every text once, then `combine`."""

    def __init__(self, members: Sequence[Scorer], k: float = 1.0, objective: str = "mean_minus_sd"):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        combine(np.zeros((1, 1)), k, objective)          # a bad k or objective fails here, not at the first call
        self.members, self.k, self.objective = list(members), k, objective

    def member_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """(members, n) every member's scores."""
        return np.stack([np.asarray(m(prompts, completions), dtype=np.float64) for m in self.members])

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return combine(self.member_scores(prompts, completions), self.k, self.objective).tolist()
