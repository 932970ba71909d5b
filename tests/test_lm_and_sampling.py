import statistics

import pytest
import torch

from models.data.corpus import CorpusConfig, generate_corpus, generate_openings
from models.lm.lm import (
    TinyLMConfig,
    load_frozen_base,
    save_pretrained,
    train_tiny_lm,
    weights_sha256,
    write_manifest,
)
from models.lm.sampling import CachedLM, SamplingConfig, encode_prompts, left_pad, positions, sample
from models.rewards.rewards import count_words, positivity


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    texts = generate_corpus(CorpusConfig(n_reviews=300, seed=1)).text.tolist()
    config = TinyLMConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=32, n_positions=96, train_steps=60,
                          batch_size=8, warmup_steps=2)
    model, tokenizer, metrics = train_tiny_lm(texts, config, device="cpu", progress=lambda _: None)
    path = tmp_path_factory.mktemp("lm")
    save_pretrained(model, tokenizer, path)
    return model, tokenizer, metrics, path


def test_corpus_is_seeded_and_varied():
    a = generate_corpus(CorpusConfig(n_reviews=1500, seed=3))
    assert a.equals(generate_corpus(CorpusConfig(n_reviews=1500, seed=3)))
    assert not a.equals(generate_corpus(CorpusConfig(n_reviews=1500, seed=4)))
    pos = positivity(a.text.tolist())
    words = [count_words(t) for t in a.text]
    assert statistics.pstdev(pos) > 0.4                       # harsh to glowing
    assert min(pos) < -0.5 < 0.5 < max(pos)
    assert min(words) < 12 and max(words) > 45                # terse to rambling
    assert a.text.nunique() > 0.95 * len(a)
    assert any(" not " in t for t in a.text)                  # negation
    assert len(set(generate_openings(50, 0))) == 50


def test_training_reduces_loss_and_reports_perplexity(tiny_lm):
    _, _, metrics, _ = tiny_lm
    curve = metrics["loss_curve"]
    assert curve[-1] < curve[0] - 1.0
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item())


def test_saved_model_reloads_in_hf_format_with_safetensors(tiny_lm):
    from transformers import AutoModelForCausalLM

    model, tokenizer, _, path = tiny_lm
    assert (path / "model.safetensors").exists() and not list(path.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([encode_prompts(tokenizer, ["I bought this kettle"])[0]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_frozen_base_refuses_changed_weights(tiny_lm, tmp_path):
    model, tokenizer, _, _ = tiny_lm
    save_pretrained(model, tokenizer, tmp_path)
    write_manifest(tmp_path, {"embedded": True, "source": "t", "weights_sha256": weights_sha256(tmp_path)})
    loaded, _, _ = load_frozen_base(tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    with open(tmp_path / "model.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(RuntimeError, match="frozen"):
        load_frozen_base(tmp_path)


def test_left_padded_cached_steps_match_full_forward(tiny_lm):
    """KV-cached, left-padded decoding gives each row the logits of its own unpadded sequence."""
    model, tokenizer, _, _ = tiny_lm
    rows = encode_prompts(tokenizer, ["I bought this kettle last week", "So I finally"])
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    assert positions(mask)[1].tolist()[-len(rows[1]):] == list(range(len(rows[1])))
    with torch.no_grad():
        lm = CachedLM(model, ids, mask)
        extra = torch.tensor([[11, 12], [13, 14]])
        for t in range(2):
            logits = lm.step(extra[:, t])
        for i, row in enumerate(rows):
            full = model(torch.tensor([row + extra[i].tolist()])).logits[0, -1]
            torch.testing.assert_close(logits[i], full, atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded_and_stops_per_row(tiny_lm):
    model, tokenizer, _, _ = tiny_lm
    prompts = generate_openings(6, 0)
    config = SamplingConfig(max_new_tokens=12, seed=5, batch_size=4)
    a, b = sample(model, tokenizer, prompts, config), sample(model, tokenizer, prompts, config)
    assert a.completion_ids == b.completion_ids
    c = sample(model, tokenizer, prompts, SamplingConfig(max_new_tokens=12, seed=6, batch_size=4))
    assert c.completion_ids != a.completion_ids
    for ids, lps, done in zip(a.completion_ids, a.base_logprobs, a.finished):
        assert len(ids) == len(lps) <= 12
        assert tokenizer.eos_token_id not in ids
        assert all(lp <= 0 for lp in lps)
        assert done or len(ids) == 12


def test_sampling_logprobs_are_base_model_logprobs(tiny_lm):
    model, tokenizer, _, _ = tiny_lm
    gen = sample(model, tokenizer, ["I got this lamp as a gift"], SamplingConfig(max_new_tokens=5, seed=0))
    prefix = encode_prompts(tokenizer, ["I got this lamp as a gift"])[0]
    seq = torch.tensor([prefix + gen.completion_ids[0]])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq).logits[0], -1)
    expected = [logp[len(prefix) - 1 + t, tok].item() for t, tok in enumerate(gen.completion_ids[0])]
    assert gen.base_logprobs[0] == pytest.approx(expected, abs=1e-4)


def test_temperature_must_be_positive(tiny_lm):
    model, tokenizer, _, _ = tiny_lm
    with pytest.raises(ValueError, match="temperature"):
        sample(model, tokenizer, ["x"], SamplingConfig(temperature=0))


def test_join_prompt_completion():
    from models.lm.sampling import join_prompt_completion

    assert join_prompt_completion("I bought it", " and it broke.") == "I bought it and it broke."
    assert join_prompt_completion("I bought it", ", sadly.") == "I bought it, sadly."
    assert join_prompt_completion("I bought it", "It broke.") == "I bought it It broke."
    assert join_prompt_completion("I bought it", "") == "I bought it"


def test_policy_steering_with_the_base_itself_is_base_sampling(tiny_lm):
    from models.evaluation.dpo import PolicySteering

    model, tokenizer, _, _ = tiny_lm
    prompts = generate_openings(5, 1)
    config = SamplingConfig(max_new_tokens=10, seed=3, batch_size=3)
    plain = sample(model, tokenizer, prompts, config)
    steered = sample(model, tokenizer, prompts, config, steering=PolicySteering(model))
    assert steered.completion_ids == plain.completion_ids
    assert max(steered.kl_nats) < 1e-6


def test_a_model_that_ignores_cache_is_refused_not_decoded_wrongly(tiny_lm):
    """Remote code written before transformers 5.25 takes `past_key_values` and swallows `cache=`
    in **kwargs: each step would then see only its last token. CachedLM checks the cache grew."""
    model, tokenizer, _, _ = tiny_lm

    class OldRemoteCode(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                    **kwargs):
            return self.inner(input_ids=input_ids, use_cache=use_cache)     # `cache=` lands in kwargs, unused

    ids, mask = left_pad(encode_prompts(tokenizer, ["The lamp", "I bought this kettle"]), tokenizer.pad_token_id)
    lm = CachedLM(OldRemoteCode(model), ids, mask)                          # the prefill itself is whole
    with pytest.raises(RuntimeError, match="did not return or extend its KV cache"):
        lm.step(torch.tensor([5, 6]))
    CachedLM(model, ids, mask).step(torch.tensor([5, 6]))                  # the model itself steps fine
