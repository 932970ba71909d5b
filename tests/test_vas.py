"""VAS decoding: beta = 0 is base sampling, weight 0 removes a reward, the steered distribution is
pi0 · exp(beta Q) / Z, the reported KL is exact; then generate() and `vas generate` end to end."""

import json
import sys
import types

import pytest
import torch
from random_heads import randomized

from models.data.corpus import CorpusConfig, generate_corpus
from models.decoding.vas import ValueGuidance, VASConfig, vas_sample
from models.lm.lm import save_pretrained, train_tokenizer, weights_sha256, write_manifest
from models.lm.sampling import SamplingConfig, encode_prompts, left_pad, sample
from models.value.value_model import ValueModel

PROMPTS = ["I bought this kettle", "The lamp", "So I finally got the blender and"]


def value_model_from(base_dir, parameterization: str, seed: int, std: float) -> ValueModel:
    """A value model with a random (non-zero) head, or every steering test would be trivial."""
    return randomized(ValueModel.from_base(base_dir, parameterization), seed, std)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_gpt2):
    """A tiny random base model with a real BPE tokenizer, saved as a materialized data folder,
    and two value models: `a` scalar, `b` qhead."""
    texts = generate_corpus(CorpusConfig(n_reviews=200, seed=0)).text.tolist()
    tokenizer = train_tokenizer(texts, 300)
    base = tiny_gpt2(len(tokenizer), seed=0, init=0.15, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    data_dir = tmp_path_factory.mktemp("data")
    base_dir = data_dir / "base_model"
    save_pretrained(base, tokenizer, base_dir)
    write_manifest(base_dir, {"embedded": True, "source": "test", "weights_sha256": weights_sha256(base_dir)})
    models = {"a": value_model_from(base_dir, "scalar", 1, 0.3), "b": value_model_from(base_dir, "qhead", 2, 0.3)}
    return types.SimpleNamespace(base=base, tokenizer=tokenizer, data_dir=data_dir, models=models)


@pytest.fixture(scope="module")
def small(tiny_gpt2, word_tokenizer):
    """V = 8: a word-level tokenizer, a peaked random base model and a scalar value model."""
    vocab = {"<eos>": 0, "<pad>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "e": 6, "f": 7}
    tokenizer = word_tokenizer(vocab, bos="<eos>", padding_side="left")
    base = tiny_gpt2(8, seed=3, init=0.4, eos=0, pad=1)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        value = value_model_from(tmp, "scalar", 4, 0.4)
    return types.SimpleNamespace(base=base, tokenizer=tokenizer, value=value)


def hidden_last(model: ValueModel, row: list[int]) -> torch.Tensor:
    return model.backbone(input_ids=torch.tensor([row])).last_hidden_state[0, -1]


@torch.no_grad()
def reference_q(model: ValueModel, prefix: list[int], candidates: list[int]) -> torch.Tensor:
    """Q(prefix, c) from scratch: scalar V(prefix·c), qhead head(h(prefix))[c]."""
    if model.parameterization == "scalar":
        seqs = torch.tensor([prefix + [c] for c in candidates])                 # (k, L+1), no padding
        return model.head(model.backbone(input_ids=seqs).last_hidden_state[:, -1]).squeeze(-1)
    return model.head(hidden_last(model, prefix))[candidates]


def hand_steered(base_logits, prefix, models, weights, top_k, mask_outside=False, min_p=VASConfig.min_p):
    """Base logits + Σ w (Q - mean Q) on the base top-k tokens with pi0 >= min_p · max pi0 (the mean
    over those); the other top-k tokens unchanged; outside the top-k unchanged or -inf."""
    top = base_logits.topk(top_k).indices.tolist()
    pi0 = torch.softmax(base_logits.double(), -1)
    on = [t for t in top if pi0[t] >= min_p * pi0.max()]
    steered = base_logits.clone() if not mask_outside else torch.full_like(base_logits, float("-inf"))
    steered[top] = base_logits[top]
    for name, w in weights.items():
        q = reference_q(models[name], prefix, on)
        steered[on] += w * (q - q.mean())
    return steered


def config(**kw):
    return SamplingConfig(**{"max_new_tokens": 8, "seed": 7, "batch_size": 2, **kw})


# ----------------------------------------------------------------------------- exactness of beta = 0


def test_beta_zero_reproduces_base_sampling_token_for_token(world):
    base = sample(world.base, world.tokenizer, PROMPTS, config())
    for weights in ({}, {"a": 0}, {"a": 0.0, "b": 0}):
        vas = vas_sample(world.base, world.tokenizer, PROMPTS, world.models, weights, config())
        assert vas.completion_ids == base.completion_ids
        assert vas.base_logprobs == base.base_logprobs
        assert vas.kl_nats == [0.0] * len(PROMPTS)
    steered = vas_sample(world.base, world.tokenizer, PROMPTS, world.models, {"a": 3.0}, config())
    assert steered.completion_ids != base.completion_ids      # the value model does steer
    assert all(kl > 0 for kl in steered.kl_nats)


def test_weight_zero_removes_a_reward_exactly_and_is_never_run(world, monkeypatch):
    def not_run(*_args, **_kwargs):
        raise AssertionError("a value model with weight 0 was run")

    only_a = vas_sample(world.base, world.tokenizer, PROMPTS, {"a": world.models["a"]}, {"a": 2.0}, config())
    for method in ("start", "candidate_q", "advance"):
        monkeypatch.setattr(world.models["b"], method, not_run)
    both = vas_sample(world.base, world.tokenizer, PROMPTS, world.models, {"a": 2.0, "b": 0.0}, config())
    assert both.completion_ids == only_a.completion_ids
    assert both.kl_nats == only_a.kl_nats


def test_unknown_weight_names_are_rejected(world):
    with pytest.raises(ValueError, match="helpfulness.*known: a, b"):
        ValueGuidance(world.models, {"helpfulness": 1.0}, VASConfig())
    with pytest.raises(ValueError, match="finite"):
        ValueGuidance(world.models, {"a": float("nan")}, VASConfig())


# ----------------------------------------------------------------------------- cached = uncached


@torch.no_grad()
def reference_vas(base, tokenizer, prompts, models, weights, cfg: SamplingConfig, vas: VASConfig):
    """VAS recomputed from scratch every step: no padding, no KV cache, one row at a time.

    Draws from one generator exactly as the sampler does: batch after batch, one (B, V)
    multinomial per step.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    out, kl = [], []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk_out, chunk_kl = reference_batch(base, tokenizer, prompts[start : start + cfg.batch_size],
                                              models, weights, cfg, vas, gen)
        out += chunk_out
        kl += chunk_kl
    return out, kl


def reference_batch(base, tokenizer, prompts, models, weights, cfg, vas, gen):
    eos = tokenizer.eos_token_id
    seqs = encode_prompts(tokenizer, prompts)
    done = [False] * len(seqs)
    out = [[] for _ in seqs]
    kl = [0.0] * len(seqs)
    for _ in range(cfg.max_new_tokens):
        rows = []
        for b, seq in enumerate(seqs):
            base_logits = base(torch.tensor([seq])).logits[0, -1]
            steered = hand_steered(base_logits, seq, models, weights, vas.top_k, vas.mask_outside_top_k)
            p = torch.softmax(steered / cfg.temperature, -1)
            p0 = torch.softmax(base_logits / cfg.temperature, -1)
            if not done[b]:
                kl[b] += float(torch.where(p > 0, p * (p.log() - p0.log()), 0.0).sum())
            rows.append(p)
        tokens = torch.multinomial(torch.stack(rows), 1, generator=gen).squeeze(-1).tolist()
        for b, token in enumerate(tokens):
            if not done[b]:
                if token == eos:
                    done[b] = True
                else:
                    out[b].append(token)
            seqs[b] = seqs[b] + [eos if done[b] else token]
        if all(done):
            break
    return out, kl


@pytest.mark.parametrize("mask_outside", [False, True])
def test_cached_decoding_matches_uncached_reference(world, mask_outside):
    weights = {"a": 1.5, "b": -1.0}
    vas_cfg = VASConfig(top_k=6, mask_outside_top_k=mask_outside)
    cfg = config(batch_size=2, max_new_tokens=6, temperature=0.8)     # two batches: state resets per batch
    got = vas_sample(world.base, world.tokenizer, PROMPTS, world.models, weights, cfg, vas_cfg)
    tokens, kl = reference_vas(world.base, world.tokenizer, PROMPTS, world.models, weights, cfg, vas_cfg)
    assert got.completion_ids == tokens
    assert got.kl_nats == pytest.approx(kl, rel=1e-3, abs=1e-5)


# ----------------------------------------------------------------------------- the distribution


def test_small_vocab_steered_distribution_is_pi0_exp_beta_q(small):
    """V = 8 = top_k: pi = pi0 · exp(beta Q) / Z exactly (centring cancels in Z), and sampled
    first-token frequencies match it."""
    beta = 1.0
    prompt = "a b"
    prefix = encode_prompts(small.tokenizer, [prompt])[0]
    with torch.no_grad():
        base_logits = small.base(torch.tensor([prefix])).logits[0, -1]
    pi0 = torch.softmax(base_logits, -1)
    q = reference_q(small.value, prefix, list(range(8)))
    target = pi0 * torch.exp(beta * q)
    target = target / target.sum()
    assert 0.5 * (target - pi0).abs().sum() > 0.1          # the steering is far from a no-op

    exact = VASConfig(top_k=8, min_p=0.0)                   # every token steered: the exact tilt
    guidance = ValueGuidance({"v": small.value}, {"v": beta}, exact)
    ids, mask = left_pad([prefix], small.tokenizer.pad_token_id)
    guidance.start(ids, mask)
    steered = torch.softmax(guidance.adjust(base_logits[None]), -1)[0]
    torch.testing.assert_close(steered, target, atol=1e-5, rtol=1e-4)

    n = 6000
    gen = vas_sample(small.base, small.tokenizer, [prompt] * n, {"v": small.value}, {"v": beta},
                     SamplingConfig(max_new_tokens=1, seed=0, batch_size=3000), exact)
    first = [ids[0] if ids else small.tokenizer.eos_token_id for ids in gen.completion_ids]
    freq = torch.bincount(torch.tensor(first), minlength=8).float() / n
    assert 0.5 * (freq - target).abs().sum() < 0.03
    assert 0.5 * (freq - pi0).abs().sum() > 0.07          # and not pi0's frequencies


def test_top_k_outside_tokens_keep_base_logits_or_are_masked(world):
    prefix = encode_prompts(world.tokenizer, [PROMPTS[0]])[0]
    ids, mask = left_pad([prefix], world.tokenizer.pad_token_id)
    with torch.no_grad():
        base_logits = world.base(ids).logits[:, -1]                   # (1, V)
    weights = {"a": 2.0, "b": 1.0}
    top = base_logits[0].topk(5).indices
    outside = torch.ones(base_logits.shape[-1], dtype=torch.bool)
    outside[top] = False
    expected = hand_steered(base_logits[0], prefix, world.models, weights, 5)

    keep = ValueGuidance(world.models, weights, VASConfig(top_k=5))
    keep.start(ids, mask)
    steered = keep.adjust(base_logits)[0]
    assert torch.equal(steered[outside], base_logits[0][outside])
    torch.testing.assert_close(steered[top], expected[top], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered[top], base_logits[0][top])

    masked = ValueGuidance(world.models, weights, VASConfig(top_k=5, mask_outside_top_k=True))
    masked.start(ids, mask)
    probs = torch.softmax(masked.adjust(base_logits)[0], -1)
    assert torch.all(probs[outside] == 0)
    torch.testing.assert_close(probs[top], torch.softmax(expected[top], -1), atol=1e-5, rtol=1e-5)

    # Sampling with the mask draws only base top-k tokens, and its KL stays finite.
    gen = vas_sample(world.base, world.tokenizer, PROMPTS, world.models, weights, config(max_new_tokens=4),
                     VASConfig(top_k=5, mask_outside_top_k=True))
    assert all(torch.isfinite(torch.tensor(gen.kl_nats)))
    for prompt_ids, completion in zip(encode_prompts(world.tokenizer, PROMPTS), gen.completion_ids):
        for t, token in enumerate(completion):
            with torch.no_grad():
                logits = world.base(torch.tensor([prompt_ids + completion[:t]])).logits[0, -1]
            assert token in logits.topk(5).indices.tolist()


def test_min_p_steers_only_candidates_near_the_likeliest(small):
    """min_p: top-k tokens with pi0 < min_p · max pi0 keep their base logits, the others get the
    values centred over them alone; min_p 0 steers all k, and a min_p only the likeliest token
    passes leaves pi0 exactly (one candidate: its centred value is 0)."""
    prefix = encode_prompts(small.tokenizer, ["a b"])[0]
    ids, mask = left_pad([prefix], small.tokenizer.pad_token_id)
    with torch.no_grad():
        base_logits = small.base(torch.tensor([prefix])).logits[0, -1]
    pi0 = torch.softmax(base_logits, -1)
    ratio = pi0 / pi0.max()
    ranked = ratio.sort().values
    min_p = float(ranked[2] + ranked[3]) / 2                # between two tokens: the 3 least likely fall below
    low = ratio < min_p
    assert int(low.sum()) == 3

    def steer(vas: VASConfig) -> torch.Tensor:
        guidance = ValueGuidance({"v": small.value}, {"v": 2.0}, vas)
        guidance.start(ids, mask)
        return guidance.adjust(base_logits[None])[0]

    got = steer(VASConfig(top_k=8, min_p=min_p))
    assert torch.equal(got[low], base_logits[low])
    q = reference_q(small.value, prefix, torch.nonzero(~low).flatten().tolist())
    torch.testing.assert_close(got[~low], base_logits[~low] + 2.0 * (q - q.mean()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, hand_steered(base_logits, prefix, {"v": small.value}, {"v": 2.0}, 8, min_p=min_p),
                               atol=1e-5, rtol=1e-5)
    everything = steer(VASConfig(top_k=8, min_p=0.0))
    assert not torch.allclose(everything[low], base_logits[low])
    only_top = steer(VASConfig(top_k=8, min_p=float(ranked[-2] + 1) / 2))
    assert torch.equal(only_top, base_logits)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="min_p"):
            ValueGuidance({"v": small.value}, {"v": 1.0}, VASConfig(min_p=bad))


def test_reported_one_step_kl_is_sum_p_log_p_over_p0(world):
    weights = {"a": 1.5, "b": -0.5}
    temperature = 0.7                    # applied once, by the sampler, to both distributions
    gen = vas_sample(world.base, world.tokenizer, PROMPTS, world.models, weights,
                     config(max_new_tokens=1, temperature=temperature, batch_size=3), VASConfig(top_k=5))
    for prefix, kl in zip(encode_prompts(world.tokenizer, PROMPTS), gen.kl_nats):
        with torch.no_grad():
            base_logits = world.base(torch.tensor([prefix])).logits[0, -1]
        p = torch.softmax(hand_steered(base_logits, prefix, world.models, weights, 5) / temperature, -1).double()
        p0 = torch.softmax(base_logits / temperature, -1).double()
        expected = float((p * (p / p0).log()).sum())
        assert expected > 1e-3
        assert kl == pytest.approx(expected, rel=1e-3)


# ----------------------------------------------------------------------------- generate() and the CLI


@pytest.fixture(scope="module")
def data_dir(world):
    world.models["a"].save(world.data_dir / "value_models" / "positivity")
    world.models["b"].save(world.data_dir / "value_models" / "conciseness")
    return world.data_dir


def test_generate_returns_n_completions_per_prompt_with_kl(data_dir):
    from models.decoding.generate import generate

    rows = generate(["I bought", "The lamp"], {"positivity": 2.0, "conciseness": 1.0}, n=3, seed=1,
                    top_k=10, max_new_tokens=5, data_dir=data_dir, device="cpu")
    assert [r["prompt"] for r in rows] == ["I bought"] * 3 + ["The lamp"] * 3
    for row in rows:
        assert {"prompt", "completion", "kl_nats", "n_tokens"} <= set(row)
        assert row["n_tokens"] <= 5 and row["kl_nats"] >= 0
        assert not any(k.startswith("learned_") for k in row)       # no reward_models folder
    assert any(r["kl_nats"] > 0 for r in rows)
    base = generate("I bought", {"positivity": 0}, n=3, seed=1, max_new_tokens=5, data_dir=data_dir, device="cpu")
    assert all(r["kl_nats"] == 0.0 for r in base)


def test_generate_names_missing_value_models_and_how_to_make_them(data_dir):
    from models.decoding.generate import generate

    with pytest.raises(ValueError, match=r"helpfulness.*conciseness, positivity.*materialize value_models"):
        generate("I bought", {"helpfulness": 1.0}, data_dir=data_dir, device="cpu")


def test_generate_scores_with_learned_reward_models(data_dir, monkeypatch, tmp_path):
    from models.decoding.generate import generate

    loaded = []

    def load_reward_model(path, device="cpu"):
        loaded.append(path.name)
        return lambda prompts, completions: [float(len(c)) for c in completions]

    monkeypatch.setitem(sys.modules, "models.rewards.reward_model",
                        types.SimpleNamespace(load_reward_model=load_reward_model))
    (tmp_path / "positivity").mkdir()
    rows = generate("I bought", {"positivity": 1.0}, n=2, max_new_tokens=4, data_dir=data_dir,
                    reward_model_dirs={"positivity": str(tmp_path / "positivity")}, device="cpu")
    assert loaded == ["positivity"]
    assert [r["learned_positivity"] for r in rows] == [float(len(r["completion"])) for r in rows]


def test_cli_generate_parses_weights_and_prints_json(data_dir, capsys):
    from orchestration.cli import main

    argv = ["generate", "--prompt", "I bought", "--prompt", "The lamp", "--weight", "positivity=2",
            "--weight", "conciseness=-0.5", "--n", "2", "--max-new-tokens", "4", "--data-dir", str(data_dir),
            "--device", "cpu"]
    assert main(argv + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all("kl_nats" in r for r in rows)
    assert main(argv) == 0
    assert "kl=" in capsys.readouterr().out
    assert main(["generate", "--prompt", "x", "--weight", "helpfulness=1", "--data-dir", str(data_dir)]) == 2
    assert "materialize value_models" in capsys.readouterr().err
    # These value models are scalar and qhead: they have no calibrated values to steer by.
    assert main(argv + ["--calibrated"]) == 2
    assert "calibrated bins" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["positivity2", "positivity=high", "=2", "positivity=nan"])
def test_cli_rejects_malformed_weights(bad, capsys):
    from orchestration.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["generate", "--prompt", "x", "--weight", bad])
    assert exit_info.value.code == 2
    assert "--weight" in capsys.readouterr().err


def test_decoding_raises_no_deprecation_from_transformers(world, caplog):
    """The decode path (base cache, a scalar's candidate scoring, a qhead) uses transformers' current
    names (`cache=` in, `.cache` out): no FutureWarning, and no deprecation logged once per process,
    so a later transformers release that drops the old names cannot break decoding unseen."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()     # logged once per process: an earlier test may have used it up
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="transformers"):
        warnings.simplefilter("error")
        gen = vas_sample(world.base, world.tokenizer, PROMPTS, world.models, {"a": 1.0, "b": 1.0},
                         SamplingConfig(max_new_tokens=4, seed=0), VASConfig(top_k=5))
    assert len(gen.texts) == len(PROMPTS)
    assert not [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()]
