"""Gold rewards: the stand-in for human judgement, looked up by name in one registry.

Gold rewards label the synthetic preference pairs and score evaluation outputs. The learned
reward models never see them directly, so over-optimization of a learned reward shows up as
a gap between learned and gold scores.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Sequence

GoldReward = Callable[[Sequence[str]], list[float]]

_WORD = re.compile(r"[\w']+")


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def positivity(texts: Sequence[str]) -> list[float]:
    """VADER compound sentiment in [-1, 1]."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


# Completions at or above this many words score 0 conciseness.
CONCISENESS_MAX_WORDS = 60


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def conciseness(texts: Sequence[str]) -> list[float]:
    """Shorter is better, bounded in [0, 1]: 1 - min(words, 60) / 60."""
    return [1.0 - min(count_words(t), CONCISENESS_MAX_WORDS) / CONCISENESS_MAX_WORDS for t in texts]


GOLD_REWARDS: dict[str, GoldReward] = {
    "positivity": positivity,
    "conciseness": conciseness,
}


def gold_reward(name: str) -> GoldReward:
    try:
        return GOLD_REWARDS[name]
    except KeyError:
        known = ", ".join(sorted(GOLD_REWARDS))
        raise KeyError(f"unknown reward attribute {name!r}; known: {known}") from None


def score_gold(texts: Sequence[str], attributes: Sequence[str]) -> dict[str, list[float]]:
    return {name: gold_reward(name)(texts) for name in attributes}
