"""ARGS (the reward model read at every prefix) as an evaluation row, the degenerate-text measures
every row carries (the 4-gram repeat share, and which rows count toward a target), and
conservative reward ensembles."""

import json

import pandas as pd
import pytest
import torch

from models.data.corpus import CorpusConfig, generate_corpus
from models.decoding.reward_guidance import reward_as_value
from models.decoding.vas import VASConfig, vas_sample
from models.evaluation.evaluation import EvalConfig, Evaluator, forward_params, repeat_share, repeats_ngram, summarize
from models.evaluation.study import eligible
from models.lm.lm import TinyLMConfig, save_pretrained, train_tiny_lm, weights_sha256, write_manifest
from models.lm.sampling import SamplingConfig, encode_prompts, sample
from models.rewards.reward_model import RewardScorer, reward_forward, reward_model_from_base

QUIET = lambda _: None  # noqa: E731
PROMPTS = ["I bought this kettle", "The lamp", "So I finally got the blender and", "My"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny trained base GPT-2 and a reward model on its first layer with a random score head."""
    texts = generate_corpus(CorpusConfig(n_reviews=300, seed=1)).text.tolist()
    config = TinyLMConfig(vocab_size=320, n_layer=2, n_head=2, n_embd=32, n_positions=96, train_steps=30,
                          batch_size=8, warmup_steps=2)
    base, tokenizer, _ = train_tiny_lm(texts, config, device="cpu", progress=QUIET)
    path = tmp_path_factory.mktemp("base")
    save_pretrained(base, tokenizer, path)
    write_manifest(path, {"embedded": True, "source": "test", "weights_sha256": weights_sha256(path)})
    reward, _ = reward_model_from_base(path, base_layers=1)
    with torch.no_grad():
        score = reward.score.weight
        score.copy_(torch.randn(score.shape, generator=torch.Generator().manual_seed(3)))
    return base.eval(), tokenizer, RewardScorer(reward.eval(), tokenizer)


def test_reward_as_value_is_the_reward_of_each_prefix_and_candidate(world):
    base, tokenizer, scorer = world
    value = reward_as_value(scorer, scale=2.0)
    assert value.backbone is scorer.model.base_model          # shared, not copied
    prefix = encode_prompts(tokenizer, ["The lamp"])[0]
    ids = torch.tensor([prefix])
    state = value.start(ids, torch.ones_like(ids))
    candidates = torch.tensor([[5, 17, 40, 101]])
    q = value.candidate_q(state, candidates)[0]                                 # (4,)
    by_hand = reward_forward(scorer.model, [prefix + [int(c)] for c in candidates[0]], tokenizer.pad_token_id,
                             "right", "cpu") / 2.0
    assert q.tolist() == pytest.approx(by_hand.tolist(), abs=1e-5)
    assert len(set(q.tolist())) == 4                                            # the test is not trivial
    with pytest.raises(ValueError, match="scale must be > 0"):
        reward_as_value(scorer, scale=0.0)


def test_where_eos_is_the_pad_token_choosing_eos_is_worth_the_text_as_it_stands(world):
    """SmolLM2's framing: no EOS is appended to a scored text, so a finished text is scored at its
    last real token, and ARGS's value of the EOS candidate is the reward of the prefix itself."""
    import copy

    base, tokenizer, scorer = world
    same_pad = copy.deepcopy(tokenizer)
    same_pad.pad_token = same_pad.eos_token
    framed = RewardScorer(scorer.model, same_pad)
    value = reward_as_value(framed, scale=2.0)
    assert value.eos_id == tokenizer.eos_token_id and reward_as_value(scorer).eos_id is None
    prefix = encode_prompts(same_pad, ["The lamp"])[0]
    ids = torch.tensor([prefix])
    q = value.candidate_q(value.start(ids, torch.ones_like(ids)), torch.tensor([[tokenizer.eos_token_id, 17]]))[0]
    assert float(q[0]) == pytest.approx(framed.score_texts(["The lamp"])[0] / 2.0, abs=1e-5)
    by_hand = reward_forward(scorer.model, [prefix + [17]], tokenizer.pad_token_id, "right", "cpu") / 2.0
    assert float(q[1]) == pytest.approx(float(by_hand[0]), abs=1e-5) != float(q[0])   # other candidates: read as before


def test_args_weight_zero_is_base_sampling_and_a_weight_steers(world):
    base, tokenizer, scorer = world
    config = SamplingConfig(max_new_tokens=12, seed=5, batch_size=4)
    plain = sample(base, tokenizer, PROMPTS, config)
    value = {"positivity": reward_as_value(scorer)}
    zero = vas_sample(base, tokenizer, PROMPTS, value, {"positivity": 0.0}, config, VASConfig(top_k=10))
    assert zero.completion_ids == plain.completion_ids and zero.kl_nats == [0.0] * len(PROMPTS)
    steered = vas_sample(base, tokenizer, PROMPTS, value, {"positivity": 4.0}, config, VASConfig(top_k=10))
    assert steered.completion_ids != plain.completion_ids and min(steered.kl_nats) >= 0 < max(steered.kl_nats)


def test_the_evaluation_runs_args_rows_with_their_cost(world):
    base, tokenizer, scorer = world
    prompts = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS})
    config = EvalConfig(bon_ns=(1,), betas=(), args_weights=(0.0, 3.0), top_k=10, max_new_tokens=12, batch_size=4,
                        seed=2, rerank_betas=(), compose_weights=())
    evaluator = Evaluator(base, tokenizer, {}, {"positivity": scorer}, ["positivity"], prompts, config, progress=QUIET)
    first = evaluator.run_base()
    zero, three = evaluator.run_args(first)
    assert zero.method == "args" and zero.params == {"weight": 0.0, "attribute": "positivity"}
    assert zero.frame.completion.tolist() == first.frame.completion.tolist()
    assert three.frame.kl_nats.mean() > 0
    # Cost: a weight-0 row runs no reward forward; a steering one scores k candidates and the chosen
    # token per step with the reward model's body and score layer, counted at their size.
    ratio = (forward_params(scorer.model) + 1) / forward_params(base)      # + 1: the value head's (zero) bias
    assert zero.forwards_per_sample == pytest.approx(first.forwards_per_sample)
    assert three.forwards_per_sample == pytest.approx(three.frame.n_tokens.mean() * (1 + ratio * 11))
    # Best-of-N pays for its reranking too: n samples and n reward scorings of prompt + completion.
    bon_config = EvalConfig(bon_ns=(1, 2), tilt_betas=(), max_new_tokens=12, batch_size=4, seed=2)
    bon1, bon2 = Evaluator(base, tokenizer, {}, {"positivity": scorer}, ["positivity"], prompts, bon_config,
                           progress=QUIET).run_best_of_n()
    prompt_tokens = sum(len(r) for r in encode_prompts(tokenizer, PROMPTS)) / len(PROMPTS)
    reward_ratio = forward_params(scorer.model) / forward_params(base)
    tokens = bon1.frame.n_tokens.mean()
    assert bon1.forwards_per_sample == pytest.approx(tokens + (prompt_tokens + tokens) * reward_ratio)
    assert bon2.forwards_per_sample > 2 * tokens
    summary = summarize([first, zero, three])
    assert list(summary.family) == ["base", "ARGS", "ARGS"]
    assert summary.param_weight.tolist()[1:] == [0.0, 3.0]


def test_forward_params_skip_lookup_tables_but_not_a_tied_output_layer(world):
    base, _, scorer = world
    total = sum(p.numel() for p in base.parameters())
    positions = base.transformer.wpe.weight.numel()       # looked up; wte is tied to lm_head, so it counts
    assert forward_params(base) == total - positions
    body = scorer.model.base_model
    lookups = body.wte.weight.numel() + body.wpe.weight.numel()
    assert forward_params(scorer.model) == sum(p.numel() for p in scorer.model.parameters()) - lookups
    assert forward_params(base, shared_with=base) == 0


def test_repeat_share_by_hand():
    texts = [
        "the cat sat on the cat sat on",        # "the cat sat on" twice: repeats
        "a b c a b c d",                        # only 3-grams repeat
        "everything you wish you did and everything you wish you did",   # repeats
        "short",                                # no 4-gram at all
    ]
    assert [repeats_ngram(t) for t in texts] == [True, False, True, False]
    assert repeat_share(texts) == 0.5
    assert repeat_share(texts, n=3) == 0.75
    assert repeat_share([]) == 0.0


def test_eligible_rows_keep_base_sampling_text():
    base = pd.Series({"distinct_2": 0.9, "repeat_4gram_share": 0.02})
    rows = pd.DataFrame({"distinct_2": [0.9, 0.81, 0.80, 0.95, 0.95],
                         "repeat_4gram_share": [0.02, 0.07, 0.0, 0.071, 0.0]})
    # 0.81 = 0.9 x 0.9 keeps; 0.80 does not; 0.07 = 0.02 + 0.05 keeps; 0.071 does not.
    assert eligible(rows, base).index.tolist() == [0, 1, 4]
    # Where Best-of-max-N is itself less diverse than base, the bar is 0.9x Best-of-N's: 0.9 x 0.85.
    bon = pd.Series({"distinct_2": 0.85, "repeat_4gram_share": 0.0})
    assert eligible(rows, base, bon).index.tolist() == [0, 1, 2, 4]
    assert eligible(rows, base, pd.Series({"distinct_2": 0.95})).index.tolist() == [0, 1, 4]
    # A summary written before the repeat share existed: distinct-2 alone.
    assert eligible(rows.drop(columns="repeat_4gram_share"), base.drop("repeat_4gram_share")).index.tolist() \
        == [0, 1, 3, 4]


def test_summary_carries_the_repeat_share(world):
    base, tokenizer, scorer = world
    prompts = pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["The lamp", "My"]})
    evaluator = Evaluator(base, tokenizer, {}, {"positivity": scorer}, ["positivity"], prompts,
                          EvalConfig(bon_ns=(1,), max_new_tokens=8, batch_size=2), progress=QUIET)
    run = evaluator.run_base()
    run.frame["completion"] = ["the cat sat on the cat sat on", "fine"]
    row = summarize([run]).iloc[0]
    assert row.repeat_4gram_share == 0.5 and json.loads(row.params) == {}


def test_args_refuses_a_reward_it_cannot_read_at_a_prefix(world, tmp_path):
    from test_reward_model import tiny_bert_classifier

    from models.rewards.reward_model import load_reward_model

    _, _, scorer = world
    with pytest.raises(ValueError, match="must share a tokenizer"):
        reward_as_value(scorer, vocab_size=scorer.model.config.vocab_size + 1)
    tiny_bert_classifier(tmp_path / "bert")
    with pytest.raises(ValueError, match="no one-output `score` layer"):
        reward_as_value(load_reward_model(tmp_path / "bert"))


def test_an_ensemble_of_identical_members_equals_its_member(world):
    from models.rewards.reward_ensemble import EnsembleScorer, combine

    _, _, scorer = world
    prompts, completions = ["The lamp", "My"], [" is great and bright.", " kettle broke."]
    one = scorer(prompts, completions)
    for objective in ("mean_minus_sd", "worst_case"):
        assert EnsembleScorer([scorer, scorer, scorer], k=2.0, objective=objective)(prompts, completions) \
            == pytest.approx(one, abs=1e-9)
    # By hand: members 1, 3 -> mean 2, sd (ddof 0) 1: k = 1 gives 1, k = 0 the mean, the worst case 1.
    scores = [[1.0, 0.0], [3.0, 0.0]]
    assert combine(scores, k=1.0).tolist() == [1.0, 0.0]
    assert combine(scores, k=0.0).tolist() == [2.0, 0.0]
    assert combine(scores, objective="worst_case").tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="k must be >= 0"):
        EnsembleScorer([scorer], k=-1.0)
    with pytest.raises(ValueError, match="unknown objective"):
        EnsembleScorer([scorer], objective="median")
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleScorer([])


def test_value_models_can_start_as_the_reward_model(smoke_world, tmp_path):
    """value_models.head_init reward_model: the scalar value model starts as the reward model read at
    every prefix, in standardized units; with no training steps it is exactly that."""
    import shutil

    import dagster as dg
    import yaml

    from assets.resources import VasSettings, build_resources
    from models.profiles import PARAMS_FILE
    from models.rewards.reward_model import load_reward_model
    from models.value.value_model import ValueModel
    from orchestration.definitions import ALL_ASSETS, ALL_CHECKS

    data = tmp_path / "data"
    shutil.copytree(smoke_world["data_dir"], data)
    profiles = yaml.safe_load(PARAMS_FILE.read_text())
    profiles["smoke"]["value_models"].update(head_init="reward_model", train_steps=0,
                                             extra_config={"learning_rate": 1e-4, "freeze_backbone": False})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(profiles))
    settings = VasSettings(profile="smoke", data_dir=str(data), device="cpu", params_file=str(params))
    result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets("value_models"),
                            resources=build_resources(settings), instance=dg.DagsterInstance.ephemeral())
    assert result.success
    stats = json.loads((data / "rollouts" / "reward_stats.json").read_text())["positivity"]
    value = ValueModel.load(data / "value_models" / "positivity.scalar")
    scorer = load_reward_model(data / "reward_models" / "positivity")
    rows = [[scorer.tokenizer.bos_token_id, 20, 31, 7], [scorer.tokenizer.bos_token_id, 9]]
    expected = (reward_forward(scorer.model, rows, scorer.tokenizer.pad_token_id, "right", "cpu") - stats["mean"]) \
        / stats["std"]
    assert value.text_values(rows, scorer.tokenizer.pad_token_id).tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    # extra_config reaches the extra (scalar) model only.
    def trained_with(name):
        return json.loads((data / "value_models" / name / "vas_value.json").read_text())["train_config"]
    assert trained_with("positivity.scalar")["learning_rate"] == 1e-4
    assert trained_with("positivity")["learning_rate"] == profiles["default"]["value_models"]["learning_rate"]
    # The distributional primary keeps its zero head: an untrained model steers nothing.
    primary = ValueModel.load(data / "value_models" / "positivity")
    assert float(primary.head.weight.abs().max()) == 0.0

    profiles["smoke"]["value_models"].update(extra_config={"learning_rat": 1e-4})
    params.write_text(yaml.safe_dump(profiles))
    with pytest.raises(Exception, match="value_models.extra_config.learning_rat"):
        dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets("value_models"),
                       resources=build_resources(settings), instance=dg.DagsterInstance.ephemeral())
    profiles["smoke"]["value_models"].update(head_init="sideways", extra_config={})
    params.write_text(yaml.safe_dump(profiles))
    with pytest.raises(Exception, match="head_init must be one of"):
        dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets("value_models"),
                       resources=build_resources(settings), instance=dg.DagsterInstance.ephemeral())


def test_the_report_says_whether_vas_beats_args_at_no_more_cost():
    from models.evaluation.report import args_comparison

    def row(method, gold, forwards, **params):
        return {"method": method, "family": {"vas": "VAS scalar", "args": "ARGS"}.get(method, method),
                "gold_positivity_mean": gold, "gold_positivity_ci95": 0.05, "kl_nats_mean": 1.0,
                "distinct_2": 0.9, "repeat_4gram_share": 0.0, "base_forwards_per_sample": forwards,
                **{f"param_{k}": v for k, v in params.items()}}

    base = [row("base", 0.1, 30), row("bon", 0.5, 500, n=16)]
    cheap_good = pd.DataFrame(base + [row("vas", 0.45, 31, beta=4.0), row("args", 0.4, 100, weight=2.0),
                                      row("args", 0.6, 100, weight=8.0) | {"repeat_4gram_share": 0.2}])
    text = args_comparison(cheap_good)
    # The looping ARGS row (repeat share 0.2) does not count: the best eligible one is weight 2.
    assert text.startswith("ARGS (weight 2): 0.400") and text.endswith("VAS beats ARGS at no more cost.")
    pricey = cheap_good.assign(base_forwards_per_sample=lambda f: f.base_forwards_per_sample.where(
        f.method != "vas", 200))
    assert args_comparison(pricey).endswith("VAS does not beat ARGS at equal or lower cost.")
    assert args_comparison(cheap_good[cheap_good.method != "args"]) == ""
    # A KL budget binds VAS only (every row here spends 1 nat): below it no VAS row is left.
    assert args_comparison(cheap_good, max_kl=1.0) == text
    assert args_comparison(cheap_good, max_kl=0.5).endswith("and a KL of at most 0.5 nats.")
    assert args_comparison(cheap_good, max_kl=0.5).startswith("ARGS (weight 2): 0.400")
