"""VASLogitsProcessor: `model.generate(..., logits_processor=[...])` steered by the project's value
models gets, at every step, the logits the project's own sampler steers to."""

import pytest
import torch

from models.decoding.logits_processor import VASLogitsProcessor
from models.decoding.vas import ValueGuidance, VASConfig
from models.lm.sampling import CachedLM, encode_prompts, left_pad

PROMPTS = ["I bought this kettle", "So I finally got the blender and"]


class Recording(VASLogitsProcessor):
    """The processor, keeping what generate gave it and what it gave back."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __call__(self, input_ids, scores):
        out = super().__call__(input_ids, scores)
        self.calls.append((input_ids.clone(), scores.clone(), out.clone()))
        return out


def prompts(world):
    ids, mask = left_pad(encode_prompts(world.tokenizer, PROMPTS), world.tokenizer.pad_token_id)
    assert (mask == 0).any(), "left padding must be exercised"
    return ids, mask


def generate(world, ids, mask, processors, seed=0, steps=8):
    torch.manual_seed(seed)
    return world.base.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                               max_new_tokens=steps, logits_processor=processors,
                               pad_token_id=world.tokenizer.pad_token_id)


@pytest.mark.parametrize("config, temperature", [(VASConfig(top_k=10), 1.0),
                                                 (VASConfig(top_k=30, soft=False, min_p=0.0), 0.7)])
def test_processed_logits_equal_the_samplers_at_every_step(steering_world, config, temperature):
    world = steering_world
    weights = {"scalar": 2.0, "dist": 1.5, "shared": -1.0}
    ids, mask = prompts(world)
    processor = Recording(world.models, weights, config, attention_mask=mask, temperature=temperature)
    out = generate(world, ids, mask, [processor])
    assert len(processor.calls) == out.shape[1] - ids.shape[1] > 1
    # The project's sampler along the same sequences: the base model's cached steps, and a guidance
    # (sharing the base's hidden state where the sampler would) started on the same prompts.
    guidance = ValueGuidance(world.models, weights, config, base_body=world.base.transformer)
    with torch.no_grad():
        lm = CachedLM(world.base, ids, mask, keep_hidden=True)
        guidance.start(ids, mask)
        changed = False
        for step, (seen, scores, processed) in enumerate(processor.calls):
            assert torch.equal(seen, out[:, : ids.shape[1] + step])
            base = lm.last_hidden_logits.float()
            assert torch.allclose(scores.float(), base, atol=1e-4)
            guidance.base_hidden(lm.last_hidden)
            want = guidance.adjust(base) / temperature
            assert torch.allclose(processed, want, atol=1e-4), f"step {step}"
            changed |= not torch.allclose(processed, base / temperature, atol=1e-3)
            token = out[:, ids.shape[1] + step]
            lm.step(token)
            guidance.advance(token)
    assert changed, "the weights must steer"


def test_zero_weights_leave_generate_as_it_is(steering_world):
    world = steering_world
    ids, mask = prompts(world)
    plain = generate(world, ids, mask, [], seed=5)
    zero = generate(world, ids, mask, [VASLogitsProcessor(world.models, {"scalar": 0.0, "dist": 0.0},
                                                          attention_mask=mask)], seed=5)
    assert torch.equal(plain, zero)


def test_misuse_is_refused(steering_world):
    world = steering_world
    ids, mask = prompts(world)
    with pytest.raises(ValueError, match="temperature"):
        VASLogitsProcessor(world.models, {"scalar": 1.0}, temperature=0)
    with pytest.raises(ValueError, match="no value model"):
        VASLogitsProcessor(world.models, {"missing": 1.0})
    processor = VASLogitsProcessor(world.models, {"scalar": 1.0}, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="attention_mask"):
        processor(ids, torch.zeros(ids.shape[0], len(world.tokenizer)))
    processor = VASLogitsProcessor(world.models, {"scalar": 1.0}, attention_mask=mask)
    scores = torch.zeros(ids.shape[0], len(world.tokenizer))
    processor(ids, scores)
    with pytest.raises(ValueError, match="one VASLogitsProcessor per generate call"):
        processor(torch.cat([ids, ids[:, :2]], 1), scores)
