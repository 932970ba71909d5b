"""VAS where users already generate: a transformers `LogitsProcessor` that steers
`model.generate(...)` with the project's value models (the official VAS code's shape).

    from models.decoding.logits_processor import VASLogitsProcessor
    processor = VASLogitsProcessor({"positivity": value_model}, {"positivity": 2.0},
                                   attention_mask=inputs["attention_mask"])
    out = base.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=48,
                        logits_processor=[processor])

It is built on the same `ValueGuidance` as the project's sampler (models/decoding/vas.py): at each step it
adds Σ_i w_i · (Q_i - mean Q_i) over pi0's top-k, exactly what `vas generate` and `vas serve` add,
then divides by its own `temperature` as the sampler does. transformers applies its temperature
and top-k/top-p warpers *before* user processors, so pass temperature=1.0 and top_k=0 to generate
and the sampling temperature here; then the processed logits equal the sampler's at every step.

The processor keeps the value models' KV caches between calls: generate calls it once per step
with the whole sequence so far, of which only the last token is new. One processor serves one
generate call (one batch of prompts); make a new one per call. Value heads on the base model's own
body run their own forward here (the processor never sees the base's hidden states).
"""

from __future__ import annotations

from typing import Mapping

import torch
from transformers import LogitsProcessor

from models.decoding.vas import ValueGuidance, VASConfig


class VASLogitsProcessor(LogitsProcessor):
    def __init__(self, value_models: Mapping, weights: Mapping[str, float], config: VASConfig | None = None,
                 attention_mask: torch.Tensor | None = None, temperature: float = 1.0):
        """attention_mask: the (B, T) mask of the prompts passed to generate (left padded); None
        when no row is padded. temperature: the sampling temperature (generate's must then be 1)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.guidance = ValueGuidance(value_models, weights, config)
        self.prompt_mask, self.temperature = attention_mask, float(temperature)
        self.length: int | None = None       # tokens of the sequence the value caches hold

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """input_ids (B, T): the sequences so far; scores (B, V): the base model's next-token logits."""
        if self.length is None:
            mask = torch.ones_like(input_ids) if self.prompt_mask is None else self.prompt_mask.to(input_ids.device)
            if mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask is {tuple(mask.shape)} but the prompts are {tuple(input_ids.shape)}: "
                                 "pass the mask of the inputs given to generate")
            self.guidance.start(input_ids, mask)
        elif input_ids.shape[1] != self.length + 1:
            raise ValueError(f"the processor holds {self.length} tokens and was given {input_ids.shape[1]}: "
                             "one VASLogitsProcessor per generate call, one token per step")
        else:
            self.guidance.advance(input_ids[:, -1])
        self.length = input_ids.shape[1]
        steered = self.guidance.adjust(scores.float())
        return (steered / self.temperature).to(scores.dtype)
