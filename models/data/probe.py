"""How varied are a model's samples? The spread of gold rewards and lengths over a batch."""

from __future__ import annotations

import statistics
from typing import Sequence

from models.lm.sampling import SamplingConfig, sample
from models.rewards.rewards import count_words, positivity


def sample_spread(model, tokenizer, prompts: Sequence[str], n_samples: int, max_new_tokens: int,
                  seed: int, device: str = "cpu") -> dict:
    """Sample n_samples completions (prompts cycled) and summarize positivity and length."""
    cycled = [prompts[i % len(prompts)] for i in range(n_samples)]
    gen = sample(model, tokenizer, cycled, SamplingConfig(max_new_tokens=max_new_tokens, seed=seed,
                                                          batch_size=128), device=device)
    pos = positivity(gen.texts)
    words = sorted(count_words(t) for t in gen.texts)
    return {
        "n": n_samples,
        "positivity_mean": statistics.fmean(pos),
        "positivity_std": statistics.pstdev(pos),
        "positivity_negative_fraction": sum(p < -0.05 for p in pos) / n_samples,
        "positivity_positive_fraction": sum(p > 0.05 for p in pos) / n_samples,
        "words_mean": statistics.fmean(words),
        "words_std": statistics.pstdev(words),
        "words_p05": float(words[int(0.05 * (n_samples - 1))]),
        "words_p95": float(words[int(0.95 * (n_samples - 1))]),
        "clean_end_fraction": sum(gen.finished) / n_samples,
        "examples": [f"{p} || {t}" for p, t in zip(gen.prompts[:6], gen.texts[:6])],
    }
