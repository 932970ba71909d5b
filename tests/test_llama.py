"""Llama-family models (RoPE, grouped-query attention, the DynamicCache) through the value model and
the samplers: the invariants tests/test_value_model.py, tests/test_vas.py and
tests/test_lm_and_sampling.py check on GPT-2, run here on tiny random Llamas written locally;
the fallback for backbones that cannot score candidates with a 4D mask; a value backbone of its own
(value_models.backbone: smaller, the same vocabulary) and the error for another vocabulary."""

import json
import logging
import types

import pytest
import test_lm_and_sampling as lm_tests
import test_value_model as value_model_tests
import test_vas as vas_tests
import torch

from models.data.corpus import CorpusConfig, generate_corpus
from models.lm.lm import save_pretrained, train_tokenizer, weights_sha256, write_manifest
from models.lm.sampling import left_pad
from models.value.candidate_scoring import CandidateScoring
from models.value.value_model import ValueModel
from models.value.value_training import backbone_init_dir

PARAMS = value_model_tests.PARAMS
V_OF_SA = ("scalar", "distributional")       # the heads that score candidates through the backbone


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_llama):
    path = tmp_path_factory.mktemp("llama-base")
    tiny_llama(value_model_tests.VOCAB, init=0.2).save_pretrained(path)
    return path


def fresh_value_model(model_dir, parameterization: str) -> ValueModel:
    """parameterization: one of test_value_model.PARAMS ("qhead:embedding": its token factors too)."""
    return value_model_tests.randomize_head(value_model_tests.build(model_dir, parameterization), seed=1).eval()


@pytest.fixture(scope="module", params=PARAMS)
def llama_value_model(request, llama_dir):
    return fresh_value_model(llama_dir, request.param)


# ----------------------------------------------------------------------------- the value model on Llama


def test_llama_value_model_is_built_on_a_llama_body(llama_value_model):
    assert type(llama_value_model.backbone).__name__ == "LlamaModel"
    cfg = llama_value_model.backbone.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.attention_dropout == 0.0


def test_llama_path_values_same_for_left_right_padding_and_single_rows(llama_value_model):
    value_model_tests.test_path_values_same_for_left_right_padding_and_single_rows(llama_value_model)


def test_llama_candidate_q_with_kv_cache_matches_uncached_forward(llama_value_model):
    """Left-padded prompts, RoPE positions from the mask, the DynamicCache grown and cropped back."""
    value_model_tests.test_candidate_q_with_kv_cache_matches_uncached_forward(llama_value_model)
    if llama_value_model.parameterization in V_OF_SA:
        assert llama_value_model.candidate_scoring.mode == "shared"     # Llama takes the 4D mask


def test_llama_save_and_load_roundtrip(llama_value_model, tmp_path):
    value_model_tests.test_save_and_load_roundtrip_is_safetensors_only(llama_value_model, tmp_path)


# ----------------------------------------------------------------------------- candidate scoring's fallback


def q_values(model: ValueModel, scoring: str) -> torch.Tensor:
    """Q of the same candidates over three decoding steps, scored one way; (3, B, k)."""
    model.candidate_scoring = CandidateScoring(scoring)
    ids, mask = left_pad([[0, 5, 6, 7, 8], [0, 9], [0, 30, 31]], 1)
    state = model.start(ids, mask)
    candidates = torch.tensor([[3, 4, 40, 41], [6, 7, 50, 2], [9, 10, 11, 12]])
    steps = []
    for step in range(3):
        steps.append(model.candidate_q(state, candidates + step))
        model.advance(state, candidates[:, 0] + step)
    return torch.stack(steps)


@pytest.mark.parametrize("parameterization", V_OF_SA)
def test_repeated_cache_scoring_gives_the_shared_cache_values(llama_dir, parameterization):
    model = fresh_value_model(llama_dir, parameterization)
    torch.testing.assert_close(q_values(model, "repeated"), q_values(model, "shared"), atol=1e-5, rtol=1e-5)
    model.candidate_scoring = CandidateScoring("repeated")
    value_model_tests.check_cached_candidates(model)                  # and against the definitions


def refuse_4d_masks(forward):
    def wrapped(*args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("this attention implementation takes 2D masks only")
        return forward(*args, attention_mask=attention_mask, **kwargs)
    return wrapped


def ignore_4d_masks(forward):
    """A backbone that silently drops a 4D mask (candidates then see each other, and the padding)."""
    def wrapped(*args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return forward(*args, attention_mask=attention_mask, **kwargs)
    return wrapped


@pytest.mark.parametrize("broken", [refuse_4d_masks, ignore_4d_masks])
@pytest.mark.parametrize("parameterization", V_OF_SA)
def test_backbone_without_4d_masks_falls_back_to_the_repeated_cache(llama_dir, parameterization, broken,
                                                                    monkeypatch, caplog):
    """The first call checks the shared path against the repeated one: a backbone that raises on the
    4D mask, or ignores it, is scored by repetition from then on, with the right values."""
    expected = q_values(fresh_value_model(llama_dir, parameterization), "shared")
    model = fresh_value_model(llama_dir, parameterization)
    monkeypatch.setattr(model.backbone, "forward", broken(model.backbone.forward))
    with caplog.at_level(logging.WARNING, logger="models.value.candidate_scoring"):
        got = q_values(model, "auto")
    assert model.candidate_scoring.mode == "repeated"
    assert "repeating the prefix cache" in caplog.text
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    value_model_tests.check_cached_candidates(model)      # the cache still holds exactly the prefixes


def test_unknown_candidate_scoring_is_rejected():
    with pytest.raises(ValueError, match="auto, shared, repeated"):
        CandidateScoring("fast")


# ----------------------------------------------------------------------------- VAS and the base sampler on Llama


@pytest.fixture(scope="module")
def llama_world(tmp_path_factory, tiny_llama):
    """test_vas's world on Llama: a tiny random Llama base with a real BPE tokenizer, saved as a
    materialized data folder; value model `a` (scalar) on a smaller Llama backbone of the same
    vocabulary, `b` (qhead) on the base's body."""
    texts = generate_corpus(CorpusConfig(n_reviews=200, seed=0)).text.tolist()
    tokenizer = train_tokenizer(texts, 300)
    ids = dict(eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    base = tiny_llama(len(tokenizer), seed=0, init=0.15, **ids)
    data_dir = tmp_path_factory.mktemp("llama-data")
    base_dir = data_dir / "base_model"
    save_pretrained(base, tokenizer, base_dir)
    write_manifest(base_dir, {"embedded": True, "source": "test", "weights_sha256": weights_sha256(base_dir)})
    small_dir = data_dir / "small_backbone"
    tiny_llama(len(tokenizer), seed=1, hidden=16, n_layer=1, n_head=2, n_kv_head=1, intermediate=32, init=0.15,
               **ids).save_pretrained(small_dir)
    models = {"a": vas_tests.value_model_from(small_dir, "scalar", 1, 0.3),
              "b": vas_tests.value_model_from(base_dir, "qhead", 2, 0.3)}
    assert models["a"].backbone.config.hidden_size < base.config.hidden_size
    return types.SimpleNamespace(base=base, tokenizer=tokenizer, data_dir=data_dir, models=models)


def test_llama_beta_zero_reproduces_base_sampling_token_for_token(llama_world):
    vas_tests.test_beta_zero_reproduces_base_sampling_token_for_token(llama_world)


@pytest.mark.parametrize("mask_outside", [False, True])
def test_llama_cached_decoding_matches_uncached_reference(llama_world, mask_outside):
    """Left padding, two batches, the value model's KV cache and the base sampler's: token for token
    the decoding recomputed from scratch, one unpadded row at a time."""
    vas_tests.test_cached_decoding_matches_uncached_reference(llama_world, mask_outside)


def test_llama_top_k_outside_tokens_keep_base_logits_or_are_masked(llama_world):
    vas_tests.test_top_k_outside_tokens_keep_base_logits_or_are_masked(llama_world)


def test_llama_reported_one_step_kl(llama_world):
    vas_tests.test_reported_one_step_kl_is_sum_p_log_p_over_p0(llama_world)


def test_llama_base_left_padded_cached_steps_match_full_forward(llama_world):
    lm_tests.test_left_padded_cached_steps_match_full_forward((llama_world.base, llama_world.tokenizer, None, None))


def test_llama_base_sampling_is_seeded_and_stops_per_row(llama_world):
    lm_tests.test_sampling_is_seeded_and_stops_per_row((llama_world.base, llama_world.tokenizer, None, None))


def test_llama_base_sampling_logprobs_are_base_model_logprobs(llama_world):
    lm_tests.test_sampling_logprobs_are_base_model_logprobs((llama_world.base, llama_world.tokenizer, None, None))


# ----------------------------------------------------------------------------- a value backbone of its own


def test_value_backbone_of_its_own_may_be_smaller_but_shares_the_vocabulary(llama_world, tmp_path):
    """value_models.backbone overrides backbone_init; a folder without a tokenizer is checked by its
    config's vocab_size, one with a tokenizer by the vocabulary itself."""
    base_dir, small_dir = llama_world.data_dir / "base_model", llama_world.data_dir / "small_backbone"
    assert backbone_init_dir("reward_model", base_dir, tmp_path / "absent", str(small_dir)) == small_dir
    assert backbone_init_dir("base", base_dir, tmp_path / "absent") == base_dir       # "" = as before
    with_tokenizer = tmp_path / "small_with_tokenizer"
    save_pretrained(ValueModel.from_base(small_dir).backbone, llama_world.tokenizer, with_tokenizer)
    assert backbone_init_dir("base", base_dir, None, str(with_tokenizer)) == with_tokenizer

    model = ValueModel.from_base(backbone_init_dir("base", base_dir, None, str(small_dir)), "distributional_qhead")
    assert model.backbone.config.hidden_size == 16 < llama_world.base.config.hidden_size
    assert model.init_info == {"init_from": str(small_dir), "init_weights_sha256": weights_sha256(small_dir)}
    model.save(tmp_path / "vm")
    saved = json.loads((tmp_path / "vm" / "value_config.json").read_text())
    assert saved["hidden_size"] == 16 and saved["init_weights_sha256"] == weights_sha256(small_dir)


def test_value_backbone_of_another_vocabulary_is_refused_naming_both(llama_world, tiny_llama, tmp_path):
    base_dir = llama_world.data_dir / "base_model"
    other_tokenizer = train_tokenizer(generate_corpus(CorpusConfig(n_reviews=200, seed=5)).text.tolist(), 300)
    other = tmp_path / "other_vocabulary"
    save_pretrained(tiny_llama(len(other_tokenizer), hidden=16, n_layer=1), other_tokenizer, other)
    with pytest.raises(ValueError, match="does not share the base model's tokenizer") as err:
        backbone_init_dir("base", base_dir, None, str(other))
    message = str(err.value)
    assert str(other) in message and str(base_dir) in message and "value_models.backbone" in message
    first = next(i for i in range(300) if other_tokenizer.convert_ids_to_tokens(i)
                 != llama_world.tokenizer.convert_ids_to_tokens(i))
    assert f"token id {first} is {other_tokenizer.convert_ids_to_tokens(first)!r} there" in message

    no_tokenizer = tmp_path / "no_tokenizer"
    tiny_llama(len(llama_world.tokenizer) + 7, hidden=16, n_layer=1).save_pretrained(no_tokenizer)
    with pytest.raises(ValueError, match=f"has no tokenizer and a vocab_size of {len(llama_world.tokenizer) + 7}"):
        backbone_init_dir("base", base_dir, None, str(no_tokenizer))
    with pytest.raises(FileNotFoundError, match="value_models.backbone 'no-such-org/no-such-model' is neither"):
        backbone_init_dir("base", base_dir, None, "no-such-org/no-such-model")
    # The pipeline's own value backbone is checked the same way, and must be given.
    with pytest.raises(ValueError, match="value_backbone .* does not share the base model's tokenizer"):
        backbone_init_dir("value_backbone", base_dir, None, "", other)
    with pytest.raises(ValueError, match="needs the value_backbone asset's folder"):
        backbone_init_dir("value_backbone", base_dir, None)
    with pytest.raises(ValueError, match="must be one of 'value_backbone', 'base', 'reward_model', got 'small'"):
        backbone_init_dir("small", base_dir, None)
