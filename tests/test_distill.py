"""A per-token head distilled from a V(s·a) teacher (models/value/distill.py): the targets are the values
the decoder would use, the student reproduces them on its training states, and it decodes on the
base model's own forward."""

import json

import pytest
import torch

from models.data.corpus import CorpusConfig, generate_corpus
from models.data.rollouts import Rollouts
from models.decoding.reward_guidance import reward_as_value
from models.decoding.vas import VASConfig, centred, vas_sample
from models.evaluation.evaluation import forward_params, forwards_per_token
from models.lm.lm import TinyLMConfig, load_frozen_base, save_pretrained, train_tiny_lm, weights_sha256, write_manifest
from models.lm.sampling import SamplingConfig, encode_prompts, sample
from models.rewards.reward_model import RewardScorer, reward_model_from_base
from models.value.distill import DistillConfig, collect_targets, distill_head, student_values
from models.value.value_model import ValueModel
from models.value.value_store import default_parameterization, value_model_folder, value_model_name

QUIET = lambda _: None  # noqa: E731
PROMPTS = ["I bought this kettle", "The lamp", "So I finally got the blender and", "My", "This is"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny trained base (pinned like the base_model asset's), a teacher (its first layer with a
    random score head, read at every prefix: a scalar V(s·a)), and pi0's rollouts of the prompts."""
    texts = generate_corpus(CorpusConfig(n_reviews=300, seed=1)).text.tolist()
    config = TinyLMConfig(vocab_size=320, n_layer=2, n_head=2, n_embd=32, n_positions=96, train_steps=30,
                          batch_size=8, warmup_steps=2)
    trained, tokenizer, _ = train_tiny_lm(texts, config, device="cpu", progress=QUIET)
    path = tmp_path_factory.mktemp("base")
    save_pretrained(trained, tokenizer, path)
    write_manifest(path, {"embedded": True, "source": "test", "weights_sha256": weights_sha256(path)})
    base, tokenizer, _ = load_frozen_base(path)
    reward, _ = reward_model_from_base(path, base_layers=1)
    with torch.no_grad():
        score = reward.score.weight
        score.copy_(torch.randn(score.shape, generator=torch.Generator().manual_seed(3)))
    teacher = reward_as_value(RewardScorer(reward.eval(), tokenizer))
    prompts = [p for p in PROMPTS for _ in range(4)]
    gen = sample(base, tokenizer, prompts, SamplingConfig(max_new_tokens=12, seed=0, batch_size=8))
    rollouts = Rollouts(encode_prompts(tokenizer, prompts), gen.completion_ids, [0.0] * len(prompts),
                        [str(PROMPTS.index(p)) for p in prompts])
    return path, base, tokenizer, teacher, rollouts


def test_targets_are_the_teachers_values_of_pi0s_top_k_at_every_state(world):
    _, base, tokenizer, teacher, rollouts = world
    config = DistillConfig(top_k=6, min_p=0.0, collect_batch_size=7)     # batches that cut prompts apart
    targets = collect_targets(base, teacher, rollouts, config, tokenizer.pad_token_id, QUIET)
    assert len(targets) == sum(len(a) for a in rollouts.action_ids)       # one state before every action
    assert bool(targets.steered.all())                                    # min_p 0 steers all k
    # State order: rollouts in batches, steps within a batch, live rows within a step. Check a few
    # states by hand: a fresh forward of the prefix for pi0's top-k, V(prefix·a) for the teacher.
    first = rollouts.prompt_ids[0], rollouts.action_ids[0]
    seen = 0
    for t in range(len(first[1])):
        live = [r for r in range(7) if t < len(rollouts.action_ids[r])]
        prefix = first[0] + first[1][:t]
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([prefix])).logits[0, -1]
        top = logits.topk(6).indices
        assert targets.candidates[seen].tolist() == top.tolist()
        by_hand = teacher.text_values([prefix + [int(a)] for a in top], tokenizer.pad_token_id)
        torch.testing.assert_close(targets.values[seen], by_hand, atol=1e-4, rtol=1e-4)
        assert targets.groups[seen] == rollouts.groups[0]
        seen += len(live)
    assert len(set(targets.values[0].tolist())) == 6                      # the check is not trivial


def test_min_p_marks_the_candidates_the_decoder_steers(world):
    _, base, tokenizer, teacher, rollouts = world
    targets = collect_targets(base, teacher, rollouts.subset(range(4)), DistillConfig(top_k=8, min_p=0.95),
                              tokenizer.pad_token_id, QUIET)
    assert bool(targets.steered[:, 0].all())                               # the likeliest always
    assert not bool(targets.steered.all())                                 # and not every candidate


def test_distilled_head_reproduces_its_teacher_on_its_training_states(world, tmp_path):
    """Stated tolerance: on the states it was fitted to, the student's centred values explain at
    least 90% of the teacher's centred variance and rank each state's candidates at Spearman >= 0.85."""
    path, base, tokenizer, teacher, rollouts = world
    config = DistillConfig(top_k=6, min_p=0.0, rank=32, train_steps=600, batch_size=64, learning_rate=1e-2,
                           eval_fraction=0.2)
    student, metrics = distill_head(base, teacher, rollouts, config, tokenizer.pad_token_id, QUIET)
    assert metrics["train_r2"] >= 0.9 and metrics["train_spearman"] >= 0.85, metrics
    assert metrics["heldout_n_states"] > 0 and metrics["train_n_states"] > metrics["heldout_n_states"]
    assert metrics["distill_loss"] < 0.1 * metrics["teacher_value_sd"] ** 2
    # A head on the frozen base's own body: the base's module, its weights untouched and frozen.
    assert student.backbone is base.base_model and student.frozen_backbone
    assert student.parameterization == "qhead" and student.factor_source == "embedding"
    assert not any(p.requires_grad for p in base.parameters())
    # No second forward per token: the cost is the base's forward plus the head's own M and P.
    head = student.head.weight.numel() + student.head.bias.numel() + student.factor_proj.numel()
    assert forwards_per_token([student], base, top_k=6) == pytest.approx(1 + head / forward_params(base))

    # Saved by reference and loaded onto the same base, it gives the same values.
    student.init_info = {"init_from": str(path), "init_weights_sha256": base.weights_sha256}
    student.save(tmp_path / "distilled")
    loaded = ValueModel.load(tmp_path / "distilled", base_model=base)
    assert loaded.backbone is base.base_model
    targets = collect_targets(base, teacher, rollouts.subset(range(3)), config, tokenizer.pad_token_id, QUIET)
    torch.testing.assert_close(student_values(loaded, targets.hidden, targets.candidates),
                               student_values(student, targets.hidden, targets.candidates), rtol=0, atol=0)
    # And it steers like its teacher: decoded at beta 0 it is base sampling, at beta 4 it moves.
    sampling = SamplingConfig(max_new_tokens=10, seed=1, batch_size=8)
    plain = sample(base, tokenizer, PROMPTS, sampling)
    off = vas_sample(base, tokenizer, PROMPTS, {"d": loaded}, {"d": 0.0}, sampling, VASConfig(top_k=6))
    on = vas_sample(base, tokenizer, PROMPTS, {"d": loaded}, {"d": 4.0}, sampling, VASConfig(top_k=6))
    assert off.completion_ids == plain.completion_ids
    assert on.completion_ids != plain.completion_ids and max(on.kl_nats) > 0


def test_centring_ignores_candidates_the_decoder_leaves_alone():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    on = torch.tensor([[True, True, True, False]])
    assert centred(values, on).tolist() == [[-1.0, 0.0, 1.0, 0.0]]


def test_masked_spearman_by_hand():
    from models.value.distill import masked_spearman

    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 9.0], [1.0, 2.0, 0.0, 0.0]])
    y = torch.tensor([[10.0, 20.0, 30.0, 40.0], [3.0, 2.0, 1.0, -5.0], [2.0, 1.0, 0.0, 0.0]])
    on = torch.tensor([[True] * 4, [True, True, True, False], [True, True, False, False]])
    rho = masked_spearman(x, y, on)
    assert rho[0].item() == pytest.approx(1.0) and rho[1].item() == pytest.approx(-1.0)  # the 4th is off
    assert torch.isnan(rho[2])                                                  # 2 candidates rank nothing
    # A partial order: ranks (0, 1, 2) against (0, 2, 1): 1 - 6 * 2 / (3 * 8) = 0.5.
    assert masked_spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 3.0, 2.0]]),
                           torch.ones(1, 3, dtype=torch.bool))[0].item() == pytest.approx(0.5)


def test_the_plain_name_answers_to_the_preferred_parameterization_where_the_attribute_has_it(tmp_path):
    # positivity has a distilled head, conciseness only its primary.
    assert default_parameterization(["distributional_qhead", "scalar", "distilled"], "distributional_qhead",
                                    "distilled") == "distilled"
    assert default_parameterization(["distributional_qhead"], "distributional_qhead", "distilled") == "distributional_qhead"
    assert value_model_name("positivity", "distilled", "distilled") == "positivity"
    assert value_model_name("positivity", "distributional_qhead", "distilled") == "positivity.distributional_qhead"
    for name, attribute, parameterization in (("positivity", "positivity", "distilled"),
                                              ("positivity.distributional_qhead", "positivity", "distributional_qhead")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vas_value.json").write_text(json.dumps({"attribute": attribute,
                                                                   "parameterization": parameterization}))
    assert value_model_folder(tmp_path, "positivity", "distributional_qhead") == tmp_path / "positivity.distributional_qhead"
    with pytest.raises(FileNotFoundError, match=r"no scalar value model for positivity under .*saved: positivity "
                                                r"\(positivity, distilled\)"):
        value_model_folder(tmp_path, "positivity", "scalar")
