"""Cheap value and reward models of a large base model (the real profile): a truncated copy of the
base (its first layers), and a value head on the frozen base model's own hidden states, trained on
features computed once per rollout, saved by reference, and decoded by sharing the base's forward."""

import json

import pytest
import torch
from test_value_training import signal_rollouts

from models.decoding.vas import ValueGuidance, VASConfig, vas_sample
from models.lm.lm import load_frozen_base, save_pretrained, train_tokenizer, truncated_copy, weights_sha256, write_manifest
from models.lm.sampling import SamplingConfig, sample
from models.lm.train_utils import FrozenFeatures
from models.value.checkpoints import load_checkpoint, save_checkpoint
from models.value.value_model import ValueModel
from models.value.value_training import ValueTrainConfig, make_batch, train_value_model

PROMPTS = ["I bought this kettle", "The lamp", "So I finally got the blender and"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_truncated_copy_is_the_first_layers_then_the_final_norm(family, tiny_gpt2, tiny_llama):
    full = tiny_gpt2(40, n_layer=3, init=0.2) if family == "gpt2" else tiny_llama(40, n_layer=3, init=0.2)
    small = truncated_copy(full, 2).eval()
    assert small.config.num_hidden_layers == 2 and type(small) is type(full)
    ids = torch.tensor([[3, 7, 9, 4, 2]])
    with torch.no_grad():
        states = full(input_ids=ids, output_hidden_states=True).hidden_states   # embeddings, then each layer
        norm = full.transformer.ln_f if family == "gpt2" else full.model.norm
        torch.testing.assert_close(small.base_model(input_ids=ids).last_hidden_state, norm(states[2]))
        torch.testing.assert_close(small(input_ids=ids).logits, full.lm_head(norm(states[2])))
    for bad in (0, 4):
        with pytest.raises(ValueError, match="of the model's 3 layers"):
            truncated_copy(full, bad)


@pytest.fixture(scope="module")
def frozen_world(tmp_path_factory, tiny_gpt2):
    """A pinned base (tiny GPT-2, real BPE tokenizer) and a value model trained on its frozen body."""
    from models.data.corpus import CorpusConfig, generate_corpus

    tokenizer = train_tokenizer(generate_corpus(CorpusConfig(n_reviews=200, seed=0)).text.tolist(), 300)
    base_dir = tmp_path_factory.mktemp("data") / "base_model"
    save_pretrained(tiny_gpt2(len(tokenizer), seed=0, init=0.15, eos=tokenizer.eos_token_id,
                              pad=tokenizer.pad_token_id), tokenizer, base_dir)
    write_manifest(base_dir, {"embedded": True, "source": "test", "weights_sha256": weights_sha256(base_dir)})
    config = ValueTrainConfig(parameterization="distributional_qhead", train_steps=30, batch_size=16,
                              learning_rate=3e-2, eval_fraction=0.25, prefix_lengths=(1,), freeze_backbone=True)
    model, metrics = train_value_model(signal_rollouts(), base_dir, config, pad_id=tokenizer.pad_token_id)
    return base_dir, model, metrics, tokenizer


def test_frozen_features_are_the_backbones_own_computed_once_per_row(frozen_world):
    base_dir, model, _, _ = frozen_world
    data = signal_rollouts(n=12)
    ids, attention, actions, _ = make_batch(data, list(range(12)), pad_id=1)
    plain = model.path_outputs(ids, attention, actions)
    calls = []
    features = FrozenFeatures(model.backbone)
    features.inner.register_forward_hook(lambda *_: calls.append(1))
    model.backbone = features
    try:
        torch.testing.assert_close(model.path_outputs(ids, attention, actions), plain)
        n_forwards = len(calls)
        torch.testing.assert_close(model.path_outputs(ids[:5], attention[:5], actions[:5]), plain[:5])
        assert len(calls) == n_forwards and len(features.memo) == 12         # re-used, not recomputed
    finally:
        model.backbone = features.inner


def test_a_frozen_backbone_trains_the_head_only_and_is_saved_by_reference(frozen_world, tmp_path):
    base_dir, model, metrics, _ = frozen_world
    assert metrics["loss_curve"][-1] < metrics["loss_curve"][0] and metrics["corr_prefix_1"] > 0.8
    fresh = ValueModel.from_base(base_dir, "distributional_qhead")
    for (name, a), (_, b) in zip(model.backbone.state_dict().items(), fresh.backbone.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)                             # untouched
    assert model.head.weight.abs().sum() > 0
    model.save(tmp_path / "v")
    config = json.loads((tmp_path / "v" / "value_config.json").read_text())
    assert config["backbone_frozen"] and config["init_weights_sha256"] == weights_sha256(base_dir)
    assert not list((tmp_path / "v").glob("model*.safetensors"))              # no copy of the base
    loaded = ValueModel.load(tmp_path / "v")
    ids, attention, actions, _ = make_batch(signal_rollouts(n=6), list(range(6)), pad_id=1)
    torch.testing.assert_close(loaded.path_outputs(ids, attention, actions), model.path_outputs(ids, attention, actions))
    # Sharing the frozen base's own module, when its pin is the backbone's.
    base, _, _ = load_frozen_base(base_dir)
    shared = ValueModel.load(tmp_path / "v", base_model=base)
    assert shared.backbone is base.base_model and loaded.backbone is not base.base_model
    base.weights_sha256 = "another model"
    assert ValueModel.load(tmp_path / "v", base_model=base).backbone is not base.base_model


def test_a_frozen_backbone_that_changed_is_refused(frozen_world, tmp_path, tiny_gpt2):
    base_dir, model, _, tokenizer = frozen_world
    moved = tmp_path / "base"
    save_pretrained(tiny_gpt2(len(tokenizer), seed=0, init=0.15), tokenizer, moved)
    model.init_info = {"init_from": str(moved), "init_weights_sha256": weights_sha256(moved)}
    model.save(tmp_path / "v")
    save_pretrained(tiny_gpt2(len(tokenizer), seed=9, init=0.15), tokenizer, moved)
    with pytest.raises(RuntimeError, match="changed since training"):
        ValueModel.load(tmp_path / "v")
    model.init_info = {}
    with pytest.raises(ValueError, match="by reference"):
        model.save(tmp_path / "w")


def test_decoding_with_the_shared_base_forward_equals_a_second_forward(frozen_world, tmp_path):
    base_dir, model, _, tokenizer = frozen_world
    model.init_info = {"init_from": str(base_dir), "init_weights_sha256": weights_sha256(base_dir)}
    model.save(tmp_path / "v")
    base, _, _ = load_frozen_base(base_dir)
    shared, separate = ValueModel.load(tmp_path / "v", base_model=base), ValueModel.load(tmp_path / "v")
    assert ValueGuidance({"p": shared}, {"p": 2.0}, base_body=base.base_model).wants_base_hidden
    assert not ValueGuidance({"p": separate}, {"p": 2.0}, base_body=base.base_model).wants_base_hidden
    config = SamplingConfig(max_new_tokens=12, seed=5, batch_size=3)
    for vas in (VASConfig(top_k=20, soft=True), VASConfig(top_k=20, calibrated=True)):
        one = vas_sample(base, tokenizer, PROMPTS, {"p": shared}, {"p": 3.0}, config, vas)
        two = vas_sample(base, tokenizer, PROMPTS, {"p": separate}, {"p": 3.0}, config, vas)
        assert one.completion_ids == two.completion_ids
        assert one.kl_nats == pytest.approx(two.kl_nats, abs=1e-5) and max(one.kl_nats) > 0.01   # it steers
    with torch.no_grad():
        shared.head.weight.zero_(), shared.head.bias.zero_()
    assert vas_sample(base, tokenizer, PROMPTS, {"p": shared}, {"p": 3.0}, config).texts == \
        sample(base, tokenizer, PROMPTS, config).texts                      # zero head: base sampling


def test_checkpoints_hold_the_trained_weights_only_and_restore_them(frozen_world, tmp_path):
    _, model, _, _ = frozen_world
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_checkpoint(tmp_path, model, optimizer, 7, [1.0], "f")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == {"head.weight", "head.bias", "token_factors"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert load_checkpoint(tmp_path, model, optimizer, "f", "cpu") == (7, [1.0])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)


def test_embedding_token_factors_project_the_backbones_token_embeddings(frozen_world, tmp_path):
    import test_value_model

    base_dir, _, _, _ = frozen_world
    model = test_value_model.randomize_head(
        ValueModel.from_base(base_dir, "distributional_qhead", token_factors="embedding"), seed=1).eval()
    assert not hasattr(model, "token_factors") and model.factor_proj.shape == (16, 32)
    tokens = torch.tensor([[3, 7], [9, 9]])
    e = model.backbone.get_input_embeddings().weight[tokens]                        # (2, 2, 32) by hand
    by_hand = (e / e.pow(2).mean(-1, keepdim=True).sqrt()) @ model.factor_proj.T
    torch.testing.assert_close(model.factors(tokens), by_hand, rtol=1e-4, atol=1e-5)
    model.save(tmp_path / "v")
    assert json.loads((tmp_path / "v" / "value_config.json").read_text())["token_factors"] == "embedding"
    loaded = ValueModel.load(tmp_path / "v")
    ids, attention, actions, _ = make_batch(signal_rollouts(n=6), list(range(6)), pad_id=1)
    torch.testing.assert_close(loaded.path_outputs(ids, attention, actions), model.path_outputs(ids, attention, actions))
    with pytest.raises(ValueError, match="token_factors must be one of"):
        ValueModel.from_base(base_dir, "distributional_qhead", token_factors="hashed")
    # It learns: the first completion token decides the reward.
    config = ValueTrainConfig(parameterization="distributional_qhead", train_steps=30, batch_size=16,
                              learning_rate=3e-2, eval_fraction=0.25, prefix_lengths=(1,), freeze_backbone=True,
                              token_factors="embedding")
    _, metrics = train_value_model(signal_rollouts(), base_dir, config, pad_id=1)
    assert metrics["corr_prefix_1"] > 0.8
