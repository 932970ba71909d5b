"""Rollouts of the frozen base model: K completions per training prompt, scored by every reward.

Stored per sample: the token ids (prompt and completion), pi0's log-probability of each sampled
token, whether it ended with EOS, and the scores of the learned reward models (what value
training fits) and of the gold rewards (for diagnostics only; nothing trains on them).

Sampling is deterministic per row: sample j of the training prompt at position i (in the whole
train split) draws its tokens from U[0, 1) numbers seeded by (i, j, seed) alone, and the batches
are fixed groups of whole prompts (batch b: prompts [b * P, (b + 1) * P), P = batch_size //
samples_per_prompt). Shard k of n holds the batches b with b % n == k (`shard_prompts`), so each
batch runs the same rows whatever the number of shards, and `merge_shards` of any n shards,
sampled in any order or on any worker, equals the unsharded rollouts bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from models.lm.sampling import SamplingConfig, encode_prompts, row_uniforms, sample
from models.rewards.rewards import score_gold


@dataclass
class Rollouts:
    """Token-level rollouts of pi0: prompt ids, action ids (EOS included when the sample ended)."""

    prompt_ids: list[list[int]]
    action_ids: list[list[int]]
    rewards: list[float]
    groups: list[str] = field(default_factory=list)   # prompt ids: held-out split never shares a prompt

    def __len__(self) -> int:
        return len(self.rewards)

    def subset(self, index: Sequence[int]) -> "Rollouts":
        return Rollouts([self.prompt_ids[i] for i in index], [self.action_ids[i] for i in index],
                        [self.rewards[i] for i in index], [self.groups[i] for i in index] if self.groups else [])

    def digest(self) -> str:
        blob = json.dumps([self.prompt_ids, self.action_ids, [round(r, 6) for r in self.rewards]])
        return hashlib.md5(blob.encode()).hexdigest()


@dataclass
class RolloutConfig:
    samples_per_prompt: int = 16
    max_new_tokens: int = 80
    temperature: float = 1.0
    batch_size: int = 128
    seed: int = 0


def prompts_per_batch(config: RolloutConfig) -> int:
    """Whole prompts per sampling batch (at least one): batch_size // samples_per_prompt."""
    return max(1, config.batch_size // config.samples_per_prompt)


def shard_prompts(n_prompts: int, config: RolloutConfig, n_shards: int, shard: int) -> list[int]:
    """Positions (in the train split) of shard `shard`'s prompts: the batches b of whole prompts
    with b % n_shards == shard. A shard may be empty when there are fewer batches than shards."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not one of 0..{n_shards - 1}")
    per_batch = prompts_per_batch(config)
    return [i for i in range(n_prompts) if (i // per_batch) % n_shards == shard]


def sample_rollouts(model, tokenizer, prompts: pd.DataFrame, config: RolloutConfig, device: str = "cpu",
                    progress: Callable[[str], None] | None = None, steering=None,
                    positions: Sequence[int] | None = None) -> pd.DataFrame:
    """prompts: columns prompt_id, prompt. One row per (prompt, sample), with prompt_pos, each
    prompt's position in the whole train split (positions; default 0..len - 1): sample j of the
    prompt at position i draws from numbers seeded by (i, j, seed) (module docstring), in batches
    of prompts_per_batch whole prompts. steering (a models.lm.sampling.Steering, e.g. VAS guidance)
    samples another policy than pi0; base_logprobs stay pi0's."""
    positions = list(range(len(prompts))) if positions is None else [int(p) for p in positions]
    if len(positions) != len(prompts):
        raise ValueError(f"{len(positions)} positions for {len(prompts)} prompts")
    k = config.samples_per_prompt
    repeated = prompts.loc[prompts.index.repeat(k)].reset_index(drop=True)
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                              seed=config.seed, batch_size=prompts_per_batch(config) * k)
    # (position, sample, seed): of the orders tried, the one under which the smoke profile's barely
    # trained pi0 (about 1% EOS as its first token) ends no sample at once for seeds 0 to 2, as the
    # old single-generator sampler happened not to; rollouts_suite rejects empty completions.
    keys = [(pos, j, config.seed) for pos in positions for j in range(k)]
    gen = sample(model, tokenizer, repeated.prompt.tolist(), sampling, device=device, progress=progress,
                 steering=steering, uniforms=row_uniforms(keys, config.max_new_tokens))
    return pd.DataFrame({
        "prompt_pos": np.repeat(np.asarray(positions, dtype=np.int64), k),
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


def merge_shards(shards: Sequence[pd.DataFrame], n_prompts: int, samples_per_prompt: int) -> pd.DataFrame:
    """The shards' rows in train-split order (prompt_pos, then sample_idx), without prompt_pos: the
    unsharded rollouts. Every (prompt, sample) must come from exactly one shard."""
    merged = pd.concat(list(shards), ignore_index=True).sort_values(["prompt_pos", "sample_idx"], kind="stable")
    expected = pd.MultiIndex.from_product([range(n_prompts), range(samples_per_prompt)])
    found = pd.MultiIndex.from_arrays([merged.prompt_pos, merged.sample_idx])
    if found.has_duplicates or not found.equals(expected):
        missing = expected.difference(found)
        raise ValueError(f"the shards hold {len(found)} rows for {len(expected)} (prompt, sample) pairs: "
                         f"{len(missing)} missing (first {list(missing[:3])}), "
                         f"{int(found.duplicated().sum())} duplicated")
    return merged.drop(columns="prompt_pos").reset_index(drop=True)


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
