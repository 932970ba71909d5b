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


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


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


class FrozenFeatures(torch.nn.Module):
    """A frozen backbone whose last hidden states are computed once per distinct token row and
    re-used: training a head on them (a value head, a reward model's score head) costs one backbone
    forward per text, not one per step.

    Called as a transformers body is (input_ids, attention_mask, ...), on right-padded rows: a row's
    states depend on its own tokens alone (causal attention, positions from its mask)."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.inner = backbone.requires_grad_(False)
        self.config = backbone.config
        self.memo: dict[tuple[int, ...], torch.Tensor] = {}

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        keys = [tuple(row[mask.bool()].tolist()) for row, mask in zip(input_ids, attention_mask)]
        todo = sorted({k for k in keys if k not in self.memo}, key=len)
        for start in range(0, len(todo), 16):
            chunk = todo[start : start + 16]
            ids, mask = pad_rows([list(k) for k in chunk], 0, "right")
            ids, mask = ids.to(input_ids.device), mask.to(input_ids.device)
            with torch.no_grad():
                h = self.inner(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
            for key, states in zip(chunk, h):
                self.memo[key] = states[: len(key)]
        hidden = torch.zeros(*input_ids.shape, self.config.hidden_size, device=input_ids.device,
                             dtype=next(iter(self.memo.values())).dtype if self.memo else torch.float32)
        for b, key in enumerate(keys):
            hidden[b, : len(key)] = self.memo[key]
        return BaseModelOutputWithPast(last_hidden_state=hidden)
