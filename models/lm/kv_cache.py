"""Rows of a left-padded KV cache joined and dropped between decode steps (continuous batching).

A decode batch here is left padded: every row ends at the last column, and each row's positions
come from its own attention mask (models.lm.sampling.positions), never from the column. So two
batches of different widths join by padding the narrower one on the left (zero keys and values
under a 0 mask, which attention never reads), and a batch loses rows by selecting them and then
dropping the left columns no remaining row uses. Keys are cached after their position embedding
(rotary) or without one (GPT-2 adds positions to the inputs), so moving a row's columns changes
none of its numbers.

Only caches of full-attention layers (transformers' DynamicLayer: keys and values (B, heads, T, d))
can be joined; a sliding-window or static cache is refused with a clear error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _layers(cache) -> list:
    from transformers.cache_utils import DynamicLayer

    layers = list(getattr(cache, "layers", None) or [])
    if not layers or not all(type(layer) is DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers}) or [type(cache).__name__]
        raise ValueError(f"continuous batching joins full-attention KV caches (DynamicLayer) only, got {kinds}")
    return layers


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]     # F.pad counts dims from the last
    return F.pad(t, pad)


def join_rows(cache, mask: torch.Tensor, other_cache, other_mask: torch.Tensor) -> torch.Tensor:
    """Append other_cache's rows after cache's, in place on `cache`; the joined (B + B', T) mask.
    Both masks are (B, T) left padded and match their caches' lengths."""
    width = max(mask.shape[1], other_mask.shape[1])
    for layer, other in zip(_layers(cache), _layers(other_cache), strict=True):
        layer.keys = torch.cat([_pad_left(layer.keys, width, 2), _pad_left(other.keys, width, 2)])
        layer.values = torch.cat([_pad_left(layer.values, width, 2), _pad_left(other.values, width, 2)])
    return torch.cat([_pad_left(mask, width, 1), _pad_left(other_mask, width, 1)])


def keep_rows(cache, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keep only rows `index` (1D long) of cache, in place, and drop the left columns none of them
    uses; the kept rows' mask."""
    mask = mask[index]
    used = mask.any(0).nonzero()
    first = int(used[0]) if len(used) else mask.shape[1]
    for layer in _layers(cache):
        layer.keys = layer.keys[index, :, first:]
        layer.values = layer.values[index, :, first:]
    return mask[:, first:]


def join_lm(lm, other) -> None:
    """Append the rows of `other`, a models.lm.sampling.CachedLM of the same model over its own
    prompts, after lm's. Where only one side kept its
    hidden states, the other's rows get zeros: rows that no head reads (models.serving.scheduler.Scheduler._hidden)."""
    lm.mask = join_rows(lm.cache, lm.mask, other.cache, other.mask)
    lm.last_hidden_logits = torch.cat([lm.last_hidden_logits, other.last_hidden_logits])
    if lm.last_hidden is not None or other.last_hidden is not None:
        like = lm.last_hidden if lm.last_hidden is not None else other.last_hidden
        mine = lm.last_hidden if lm.last_hidden is not None else like.new_zeros((len(lm.mask) - len(other.mask),
                                                                                 like.shape[1]))
        theirs = other.last_hidden if other.last_hidden is not None else like.new_zeros((len(other.mask),
                                                                                         like.shape[1]))
        lm.last_hidden = torch.cat([mine, theirs])


def keep_lm(lm, index: torch.Tensor) -> None:
    """Keep only rows `index` (1D long) of lm, in their order."""
    lm.mask = keep_rows(lm.cache, lm.mask, index)
    lm.last_hidden_logits = lm.last_hidden_logits[index]
    if lm.last_hidden is not None:
        lm.last_hidden = lm.last_hidden[index]
