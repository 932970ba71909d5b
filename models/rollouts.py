"""Rollouts of the frozen base model: K completions per training prompt, scored by every reward.

Stored per sample: the token ids (prompt and completion), pi0's log-probability of each sampled
token, whether it ended with EOS, and the scores of the learned reward models (what value
training fits) and of the gold rewards (for diagnostics only; nothing trains on them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from models.rewards import score_gold
from models.sampling import SamplingConfig, encode_prompts, sample
from models.value_training import Rollouts


@dataclass
class RolloutConfig:
    samples_per_prompt: int = 16
    max_new_tokens: int = 80
    temperature: float = 1.0
    batch_size: int = 128
    seed: int = 0


def sample_rollouts(model, tokenizer, prompts: pd.DataFrame, config: RolloutConfig, device: str = "cpu",
                    progress: Callable[[str], None] | None = None, steering=None) -> pd.DataFrame:
    """prompts: columns prompt_id, prompt. One row per (prompt, sample). steering (a
    models.sampling.Steering, e.g. VAS guidance) samples another policy than pi0; base_logprobs
    stay pi0's."""
    repeated = prompts.loc[prompts.index.repeat(config.samples_per_prompt)].reset_index(drop=True)
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                              seed=config.seed, batch_size=config.batch_size)
    gen = sample(model, tokenizer, repeated.prompt.tolist(), sampling, device=device, progress=progress,
                 steering=steering)
    return pd.DataFrame({
        "prompt_id": repeated.prompt_id,
        "prompt": repeated.prompt,
        "sample_idx": np.tile(np.arange(config.samples_per_prompt), len(prompts)),
        "completion": gen.texts,
        "prompt_ids": encode_prompts(tokenizer, repeated.prompt.tolist()),
        "completion_ids": gen.completion_ids,
        "base_logprobs": gen.base_logprobs,
        "finished": gen.finished,
        "n_tokens": gen.n_tokens,
    })


def score_rollouts(df: pd.DataFrame, scorers: Mapping[str, Callable], gold_attributes: Sequence[str]) -> pd.DataFrame:
    """Add learned_<attr> from each reward model and gold_<attr> from the gold registry."""
    out = df.copy()
    for name, scorer in scorers.items():
        out[f"learned_{name}"] = scorer(out.prompt.tolist(), out.completion.tolist())
    gold = score_gold(out.completion.tolist(), [a for a in gold_attributes])
    for name, values in gold.items():
        out[f"gold_{name}"] = values
    return out


def reward_stats(df: pd.DataFrame, column: str) -> dict[str, float]:
    values = df[column].to_numpy(dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std() or 1.0)}


def training_rollouts(df: pd.DataFrame, column: str, eos_id: int, stats: Mapping[str, float]) -> Rollouts:
    """Value-training data for one reward: actions include EOS when the sample ended (stopping is
    a choice the value of which VAS must learn), rewards standardized with `stats` so that one
    beta means the same strength for every reward."""
    # Parquet hands back numpy arrays; plain int lists keep the training data JSON-hashable.
    actions = [[int(t) for t in ids] + ([eos_id] if done else []) for ids, done in zip(df.completion_ids, df.finished)]
    rewards = ((df[column].to_numpy(dtype=np.float64) - stats["mean"]) / stats["std"]).tolist()
    return Rollouts(prompt_ids=[[int(t) for t in p] for p in df.prompt_ids], action_ids=actions, rewards=rewards,
                    groups=df.prompt_id.astype(str).tolist())
