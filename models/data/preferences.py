"""Synthetic preference pairs: two base-model completions, labelled by a noisy Bradley-Terry draw.

For a pair (a, b) and a gold reward r, the rater prefers a with probability
sigmoid((r(a) - r(b)) / scale): nearly coin flips for close pairs, reliable for clear ones,
like human raters. Reward models learn from these labels only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from models.lm.sampling import SamplingConfig, sample
from models.rewards.rewards import gold_reward

# The `origin` of a pair: sampled from the base model, or a pair of human continuations (snippet_pairs).
SAMPLED, HUMAN_SNIPPETS = "sampled", "human_snippets"


@dataclass
class PairSynthesisConfig:
    attributes: tuple[str, ...] = ("positivity", "conciseness")
    pairs_per_attribute: int = 1536
    max_new_tokens: int = 80
    temperature: float = 1.0
    batch_size: int = 128
    # attribute -> Bradley-Terry scale (0.1 for an attribute not listed)
    bt_scale: dict | None = field(default_factory=lambda: {"positivity": 0.15, "conciseness": 0.08})
    # attribute -> pairs of human-written continuations (snippet_pairs) added to the sampled ones,
    # when the prompts are cut from human-rated snippets (prompts.snippets).
    snippet_pairs: dict = field(default_factory=dict)
    seed: int = 0


def bradley_terry_prob(r_a: float, r_b: float, scale: float) -> float:
    """P(a preferred over b) under a Bradley-Terry model with logit (r_a - r_b) / scale."""
    if scale <= 0:
        raise ValueError(f"Bradley-Terry scale must be > 0, got {scale}")
    z = (r_a - r_b) / scale
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def label_pairs(texts_a: Sequence[str], texts_b: Sequence[str], attribute: str, scale: float,
                rng: np.random.Generator) -> tuple[list[bool], list[float], list[float]]:
    """For each pair: whether a is chosen, and the gold rewards of a and b."""
    score = gold_reward(attribute)
    r_a, r_b = score(texts_a), score(texts_b)
    draws = rng.random(len(r_a))
    a_chosen = [bool(u < bradley_terry_prob(x, y, scale)) for u, x, y in zip(draws, r_a, r_b)]
    return a_chosen, r_a, r_b


def synthesize_pairs(model, tokenizer, prompts: pd.DataFrame, config: PairSynthesisConfig,
                     device: str = "cpu", progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Pairs for every attribute from `prompts` (columns prompt_id, prompt), cycled as needed.

    Columns: pair_id, attribute, prompt_id, prompt, chosen, rejected, gold_chosen, gold_rejected,
    origin ("sampled").
    """
    rng = np.random.default_rng(config.seed)
    frames = []
    for a_index, attribute in enumerate(config.attributes):
        n = config.pairs_per_attribute
        rows = prompts.iloc[[i % len(prompts) for i in range(n)]]
        doubled = rows.prompt.tolist() * 2
        sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  seed=config.seed + 1000 * (a_index + 1), batch_size=config.batch_size)
        gen = sample(model, tokenizer, doubled, sampling, device=device, progress=progress)
        texts_a, texts_b = gen.texts[:n], gen.texts[n:]
        frames.append(_labelled(attribute, f"{attribute[:3]}-", rows.prompt_id.tolist(), rows.prompt.tolist(),
                                texts_a, texts_b, config, rng))
    return _informative(pd.concat(frames, ignore_index=True).assign(origin=SAMPLED))


def snippet_pairs(triples: pd.DataFrame, attribute: str, config: PairSynthesisConfig) -> pd.DataFrame:
    """Pairs of human-written continuations, labelled by the same Bradley-Terry rater as the
    sampled pairs: `triples` holds prompt_id, prompt, text_a, text_b
    (models.data.human_snippets.continuation_triples). Columns as synthesize_pairs', origin
    "human_snippets"; they cost no sampling, so a reward model can learn from many more of them."""
    rng = np.random.default_rng(config.seed + 7)
    pairs = _labelled(attribute, f"{attribute[:3]}-snip-", triples.prompt_id.tolist(), triples.prompt.tolist(),
                      triples.text_a.tolist(), triples.text_b.tolist(), config, rng)
    return _informative(pairs.assign(origin=HUMAN_SNIPPETS))


def _labelled(attribute: str, id_prefix: str, prompt_ids: list, prompts: list, texts_a: list, texts_b: list,
              config: PairSynthesisConfig, rng: np.random.Generator) -> pd.DataFrame:
    scale = (config.bt_scale or {}).get(attribute, 0.1)
    a_chosen, r_a, r_b = label_pairs(texts_a, texts_b, attribute, scale, rng)
    return pd.DataFrame({
        "pair_id": [f"{id_prefix}{i:06d}" for i in range(len(texts_a))],
        "attribute": attribute,
        "prompt_id": prompt_ids,
        "prompt": prompts,
        "chosen": [a if c else b for a, b, c in zip(texts_a, texts_b, a_chosen)],
        "rejected": [b if c else a for a, b, c in zip(texts_a, texts_b, a_chosen)],
        "gold_chosen": [x if c else y for x, y, c in zip(r_a, r_b, a_chosen)],
        "gold_rejected": [y if c else x for x, y, c in zip(r_a, r_b, a_chosen)],
    })


def _informative(pairs: pd.DataFrame) -> pd.DataFrame:
    """Identical or empty texts carry no preference; they are counted by the caller, not kept."""
    keep = (pairs.chosen != pairs.rejected) & (pairs.chosen.str.strip() != "") & (pairs.rejected.str.strip() != "")
    return pairs[keep].reset_index(drop=True)
