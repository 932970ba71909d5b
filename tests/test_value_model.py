"""Value model: zero head, padding-invariant path values, KV-cached candidate scoring, files."""

import json

import pytest
import torch

from models.lm.sampling import left_pad
from models.lm.train_utils import pad_rows
from models.value.distributional import value_of
from models.value.value_model import ValueModel

VOCAB = 64
# "qhead:embedding": the factorized per-token head (token factors from the embeddings), which
# models/value/distill.py fits; the others take their default token factors.
PARAMS = ["scalar", "qhead", "qhead:embedding", "distributional", "distributional_qhead"]


def build(base_dir, spec: str) -> ValueModel:
    parameterization, _, factors = spec.partition(":")
    return ValueModel.from_base(base_dir, parameterization, token_factors=factors or "free")


def randomize_head(model: ValueModel, seed: int, std: float = 0.3) -> ValueModel:
    """Non-zero head weights, or every value test would pass trivially."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen) * std)
        model.head.bias.copy_(torch.randn(model.head.bias.shape, generator=gen) * std)
        if model.rank:
            factors = model.token_factors if model.factor_source == "free" else model.factor_proj
            factors.copy_(torch.randn(factors.shape, generator=gen) / (1 if model.factor_source == "free" else 8))
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_gpt2):
    path = tmp_path_factory.mktemp("base")
    # GPT-2's default dropout left on: the value model must turn it off.
    tiny_gpt2(VOCAB, init=0.2, dropout=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=PARAMS)
def value_model(request, base_dir):
    return randomize_head(build(base_dir, request.param), seed=1).eval()


def hidden_of(model: ValueModel, row: list[int]) -> torch.Tensor:
    """Last-layer hidden states (L, H) of one unpadded row, from scratch."""
    with torch.no_grad():
        return model.backbone(input_ids=torch.tensor([row])).last_hidden_state[0]


# Three (prompt, completion) rows of different lengths.
ROWS = [([0, 5, 6, 7], [8, 9, 10]), ([0, 11], [12, 13]), ([0, 20, 21, 22, 23, 24], [25, 26])]   # 7, 4, 8 tokens


def action_masks(mask: torch.Tensor, prompt_lens: list[int]) -> torch.Tensor:
    """1 on completion tokens: after each row's prompt, before its padding."""
    action = torch.zeros_like(mask)
    for b, n_prompt in enumerate(prompt_lens):
        real = mask[b].nonzero().squeeze(1)
        action[b, real[n_prompt:]] = 1
    return action


@pytest.mark.parametrize("parameterization", PARAMS)
def test_fresh_value_model_outputs_exactly_zero_with_dropout_off(base_dir, parameterization):
    model = build(base_dir, parameterization)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    n_bins = 41
    expected_out = {"scalar": 1, "qhead": VOCAB, "qhead:embedding": 16, "distributional": n_bins,
                    "distributional_qhead": n_bins * 16}
    assert model.head.out_features == expected_out[parameterization]
    rows = [p + c for p, c in ROWS]
    ids, mask = left_pad(rows, 1)
    u = model.path_outputs(ids, mask, torch.ones_like(mask))
    assert torch.equal(u, torch.zeros_like(u))
    state = model.start(ids, mask)
    for beta in (None, 4.0):
        # A zero distributional head is a uniform histogram: every candidate gets the same value.
        q = model.candidate_q(state, torch.tensor([[3, 4]] * len(rows)), beta=beta)
        assert torch.equal(q - q.mean(-1, keepdim=True), torch.zeros_like(q))
    # Dropout off: in train mode (as TD training runs it) two forwards agree exactly.
    cfg = model.backbone.config
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.0
    model.train()
    h1 = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    h2 = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(h1, h2)


def test_backbone_starts_from_the_base_weights(base_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = ValueModel.from_base(base_dir)
    base_body = base.transformer.state_dict()
    for name, tensor in model.backbone.state_dict().items():
        torch.testing.assert_close(tensor, base_body[name], rtol=0, atol=0)
    assert model.init_info["init_weights_sha256"]


def test_unknown_parameterization_is_rejected(base_dir):
    with pytest.raises(ValueError, match="scalar, qhead, distributional"):
        ValueModel.from_base(base_dir, "advantage")


def test_path_values_same_for_left_right_padding_and_single_rows(value_model):
    rows = [p + c for p, c in ROWS]
    prompt_lens = [len(p) for p, _ in ROWS]
    ids_l, mask_l = left_pad(rows, 1)
    ids_r, mask_r = pad_rows(rows, 1, "right")
    assert not mask_l.all() and not mask_r.all()           # both batches really are padded
    with torch.no_grad():
        u_l = value_model.path_outputs(ids_l, mask_l, action_masks(mask_l, prompt_lens))
        u_r = value_model.path_outputs(ids_r, mask_r, action_masks(mask_r, prompt_lens))
    width = ids_l.shape[1]
    for b, ((prompt, completion), row) in enumerate(zip(ROWS, rows)):
        action = torch.tensor([0] * len(prompt) + [1] * len(completion))[None]
        with torch.no_grad():
            single = value_model.path_outputs(torch.tensor([row]), torch.ones_like(action), action)[0]
        torch.testing.assert_close(u_l[b, width - len(row):], single, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(u_r[b, : len(row)], single, atol=1e-5, rtol=1e-5)
        assert torch.all(u_l[b, : width - len(row)] == 0) and torch.all(u_r[b, len(row):] == 0)
        assert torch.all(single[: len(prompt)] == 0) and torch.all(single[len(prompt):] != 0)

        # Against the definitions, computed from scratch per prefix.
        for t in range(len(prompt), len(row)):
            expected = reference_q(value_model, row[:t], [row[t]])[0]
            torch.testing.assert_close(single[t], expected.detach(), atol=1e-5, rtol=1e-5)


def test_path_values_carry_gradients_to_head_and_backbone(value_model):
    rows = [p + c for p, c in ROWS]
    ids, mask = pad_rows(rows, 1, "right")
    action = action_masks(mask, [len(p) for p, _ in ROWS])
    value_model.zero_grad()
    value_model.path_outputs(ids, mask, action).pow(2).sum().backward()
    assert value_model.head.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in value_model.parameters() if p.grad is not None)
    assert value_model.backbone.wte.weight.grad.abs().sum() > 0
    value_model.zero_grad(set_to_none=True)


def reference_q(model: ValueModel, prefix: list[int], candidates: list[int]) -> torch.Tensor:
    """The head's output for each candidate without any cache, by definition: scalar V(prefix·c),
    qhead head(h(prefix))[c], distributional the histogram logits of V(prefix·c), distributional_qhead
    M(h(prefix)) · f_c, with M the head's output as an (n_bins, rank) matrix."""
    with torch.no_grad():
        if model.parameterization in ("scalar", "distributional"):
            seqs = torch.tensor([prefix + [c] for c in candidates])                # (k, L+1)
            h = model.backbone(input_ids=seqs).last_hidden_state[:, -1]          # (k, H)
            out = model.head(h)
            return out.squeeze(-1) if model.parameterization == "scalar" else out
        if model.parameterization == "qhead" and not model.rank:
            return model.head(hidden_of(model, prefix)[-1])[candidates]
        # Factorized heads: f_c = P · e_c / rms(e_c), or a free vector per token.
        e = model.backbone.get_input_embeddings().weight[candidates]                # (k, E)
        f = (e / e.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) @ model.factor_proj.T \
            if model.factor_source == "embedding" else model.token_factors[candidates]  # (k, rank)
        if model.parameterization == "qhead":
            return f @ model.head(hidden_of(model, prefix)[-1])
        m = model.head(hidden_of(model, prefix)[-1]).view(model.support.n_bins, model.rank)
        return torch.stack([m @ fc for fc in f])


def test_candidate_q_with_kv_cache_matches_uncached_forward(value_model):
    # scalar scoring passes a custom 4D mask: check both attention kernels that accept one.
    kernels = ["sdpa", "eager"] if value_model.parameterization in ("scalar", "distributional") else ["sdpa"]
    try:
        for attn in kernels:
            value_model.backbone.set_attn_implementation(attn)
            check_cached_candidates(value_model)
    finally:
        value_model.backbone.set_attn_implementation("sdpa")


def check_cached_candidates(value_model, tolerance: float = 1e-5):
    prompts = [[0, 5, 6, 7, 8], [0, 9], [0, 30, 31]]
    ids, mask = left_pad(prompts, 1)
    gen = torch.Generator().manual_seed(0)
    state = value_model.start(ids, mask)
    prefixes = [list(p) for p in prompts]
    for _ in range(3):
        candidates = torch.stack([torch.randperm(VOCAB, generator=gen)[:6] for _ in prompts])   # (B, 6)
        for beta in (None, 3.0):
            q = value_model.candidate_q(state, candidates, beta=beta)
            assert q.shape == (3, 6)
            for b, prefix in enumerate(prefixes):
                expected = reference_q(value_model, prefix, candidates[b].tolist())
                if value_model.is_distributional:
                    expected = value_of(expected, value_model.support, beta)
                torch.testing.assert_close(q[b], expected, atol=tolerance, rtol=tolerance)
        chosen = candidates[:, 0]
        value_model.advance(state, chosen)
        for b, token in enumerate(chosen.tolist()):
            prefixes[b].append(token)
    # Scoring candidates leaves the cache holding exactly the prefixes.
    assert state.cache.get_seq_length() == ids.shape[1] + 3


def test_save_and_load_roundtrip_is_safetensors_only(value_model, tmp_path):
    value_model.save(tmp_path / "vm")
    names = {p.name for p in (tmp_path / "vm").iterdir()}
    assert {"config.json", "model.safetensors", "value_head.safetensors", "value_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((tmp_path / "vm" / "value_config.json").read_text())
    assert config["parameterization"] == value_model.parameterization
    assert config["init_weights_sha256"] == value_model.init_info["init_weights_sha256"]

    loaded = ValueModel.load(tmp_path / "vm")
    assert loaded.parameterization == value_model.parameterization
    rows = [p + c for p, c in ROWS]
    ids, mask = left_pad(rows, 1)
    action = action_masks(mask, [len(p) for p, _ in ROWS])
    with torch.no_grad():
        torch.testing.assert_close(loaded.path_outputs(ids, mask, action),
                                   value_model.path_outputs(ids, mask, action), rtol=0, atol=0)
    assert loaded.support == value_model.support and loaded.rank == value_model.rank
    with pytest.raises(FileNotFoundError, match="value_config.json"):
        ValueModel.load(tmp_path)


def test_untrained_distributional_head_steers_nothing_at_large_k_and_asymmetric_support(base_dir):
    from models.decoding.vas import ValueGuidance, VASConfig
    from models.value.distributional import Support

    model = ValueModel.from_base(base_dir, "distributional_qhead", support=Support(v_min=-1.13, v_max=1.9))
    guidance = ValueGuidance({"p": model}, {"p": 32.0}, VASConfig(top_k=40))
    ids, mask = left_pad([[0, 5, 6], [0, 7]], 1)
    guidance.start(ids, mask)
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    assert torch.equal(guidance.adjust(logits), logits)
