"""Small pieces every trainer and sampler shares: padding, autocast, dropout off, the held-out
split by prompt, and the learning-rate schedule. One definition each, so they cannot drift apart."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Hashable, Sequence

import numpy as np
import torch


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left or the right."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (half the memory traffic); full precision on CPU, where bf16 is slow
    for small models and float32 keeps the tests exact."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def dropout_off(model: torch.nn.Module) -> None:
    """p = 0 in every nn.Dropout: the same input always gives the same output (a pair's two texts
    are scored by one function; TD targets come from the network being trained)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def split_groups(groups: Sequence[Hashable], eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices: a seeded round(eval_fraction * n) of the n distinct groups
    (prompts) are held out with all their rows, so no group is on both sides."""
    unique = sorted(set(groups))
    n_eval = int(round(len(unique) * eval_fraction))
    held = set(np.random.default_rng(seed).permutation(unique)[:n_eval].tolist()) if n_eval else set()
    train = [i for i, g in enumerate(groups) if g not in held]
    evals = [i for i, g in enumerate(groups) if g in held]
    return train, evals


def warmup_lr(step: int, learning_rate: float, warmup_steps: int, train_steps: int, decay: str = "linear") -> float:
    """Learning rate at a step: linear warmup to learning_rate over warmup_steps, then a linear or
    cosine decay to 0 at train_steps.

    Not transformers' get_*_schedule_with_warmup: those start at lr 0 (a wasted first step) and
    reach the peak one step later; the trained base model, and every number after it, would change.
    """
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, train_steps - warmup_steps)
    if decay == "linear":
        return learning_rate * max(0.0, 1 - progress)
    if decay == "cosine":
        return learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"decay must be 'linear' or 'cosine', got {decay!r}")
