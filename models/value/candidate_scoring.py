"""Hidden states of k one-token continuations of each cached prefix: how a V(s·a) value model
(models/value/value_model.py, `scalar` and `distributional`) scores the decoder's k candidate tokens.

Two ways, the same numbers:

- `shared`: the k candidates go in as k tokens of one row, all at the next position, with a 4D
  mask that lets each see the prefix and itself but not the other candidates: k independent
  continuations over the one prefix KV cache, without copying it (several times faster on CPU).
  It needs an attention implementation that takes a custom 4D mask (SDPA and eager do, for GPT-2
  and Llama here; flash-attention kernels and some architectures do not).
- `repeated`: the prefix cache repeated k times, each candidate a row of its own with a plain 2D
  mask: k copies of the cache, but any architecture with a croppable transformers Cache runs it.

`CandidateScoring("auto")` (what a value model uses) checks once, on its first call, that the
shared path runs and agrees with the repeated one, then keeps the shared path; if it raises or
disagrees, it warns and scores every later call by repetition.
"""

from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger(__name__)

MODES = ("auto", "shared", "repeated")


def shared_cache_hidden(backbone, cache, mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, k, H) hidden states of candidates (B, k) appended to the prefixes in cache (mask (B, T),
    left padded), in one forward over the shared cache. The cache grows in place by the k
    candidates' keys and is cropped back, so it holds exactly the prefixes again."""
    batch, k = candidates.shape
    width = mask.shape[1]
    prefix = mask.bool()[:, None, :].expand(batch, k, width)                        # (B, k, T)
    own = torch.eye(k, dtype=torch.bool, device=candidates.device).expand(batch, k, k)
    allowed = torch.cat([prefix, own], dim=-1)[:, None]                             # (B, 1, k, T+k)
    dtype = backbone.dtype
    # Additive float mask: eager attention adds it, SDPA accepts it as is.
    bias = torch.zeros(allowed.shape, dtype=dtype, device=candidates.device)
    bias = bias.masked_fill(~allowed, torch.finfo(dtype).min)
    pos = mask.sum(-1, keepdim=True).expand(batch, k)                               # (B, k) the next position
    lengths = [layer.get_seq_length() for layer in cache.layers]
    try:
        out = backbone(input_ids=candidates, attention_mask=bias, position_ids=pos,
                       cache=cache, use_cache=True)
    finally:
        # The candidates' keys are dropped again: from every layer they reached (all of them,
        # unless the forward failed part way).
        for layer, before in zip(cache.layers, lengths):
            if (grown := layer.get_seq_length() - before) > 0:
                layer.crop(-grown)
    return out.last_hidden_state


def repeated_cache_hidden(backbone, cache, mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """What shared_cache_hidden computes, with the prefix cache copied k times (B·k rows of one
    token each, a 2D mask): slower and k times the cache's memory, but no custom mask. The cache
    given is left as it was."""
    batch, k = candidates.shape
    rows = copy.deepcopy(cache)
    rows.batch_repeat_interleave(k)                                                 # row b -> rows b·k .. b·k+k-1
    prefix = mask.repeat_interleave(k, dim=0)                                       # (B·k, T)
    step_mask = torch.cat([prefix, prefix.new_ones((batch * k, 1))], dim=1)
    pos = prefix.sum(-1, keepdim=True)                                              # (B·k, 1) the next position
    out = backbone(input_ids=candidates.reshape(batch * k, 1), attention_mask=step_mask, position_ids=pos,
                   cache=rows, use_cache=True)
    return out.last_hidden_state.reshape(batch, k, -1)


class CandidateScoring:
    """Picks the way to score candidates: `shared`, `repeated`, or `auto` (shared after a one-time
    check against repeated, repeated for good when that check fails)."""

    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"unknown candidate scoring {mode!r}; known: {', '.join(MODES)}")
        self.mode = mode

    def __call__(self, backbone, cache, mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        if self.mode == "shared":
            return shared_cache_hidden(backbone, cache, mask, candidates)
        if self.mode == "repeated":
            return repeated_cache_hidden(backbone, cache, mask, candidates)
        slow = repeated_cache_hidden(backbone, cache, mask, candidates)
        try:
            fast = shared_cache_hidden(backbone, cache, mask, candidates)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - any refusal of the 4D mask means: use the other path
            return self._fall_back(backbone, f"it raised {type(err).__name__}: {err}", slow)
        # float32 agrees to rounding; half precision to its own resolution.
        tol = 1e-3 if fast.dtype == torch.float32 else 5e-2
        gap = float((fast.float() - slow.float()).abs().max())
        if gap > tol * max(1.0, float(slow.float().abs().max())):
            return self._fall_back(backbone, f"its hidden states differ by {gap:.3g}", slow)
        self.mode = "shared"
        return fast

    def _fall_back(self, backbone, why: str, slow: torch.Tensor) -> torch.Tensor:
        log.warning(f"{type(backbone).__name__} cannot score candidates over a shared KV cache with a 4D mask "
                    f"({why}); scoring them by repeating the prefix cache instead (slower)")
        self.mode = "repeated"
        return slow
