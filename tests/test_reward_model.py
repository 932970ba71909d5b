import math
import random

import pandas as pd
import pytest
import torch

from models.data.corpus import NEGATIVE, POSITIVE, CorpusConfig, generate_corpus, generate_openings
from models.lm.lm import TinyLMConfig, load_frozen_base, save_pretrained, train_tiny_lm, weights_sha256, write_manifest
from models.lm.sampling import join_prompt_completion
from models.rewards.reward_model import (
    RewardScorer,
    RewardTrainConfig,
    encode_texts,
    gold_ceiling_accuracy,
    load_reward_model,
    pair_accuracy,
    save_reward_model,
    split_by_prompt,
    train_reward_model,
)
from models.rewards.rewards import conciseness

QUIET = lambda _: None  # noqa: E731


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny frozen base GPT-2, saved with its manifest like the base_model asset does."""
    texts = generate_corpus(CorpusConfig(n_reviews=300, seed=1)).text.tolist()
    config = TinyLMConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=32, n_positions=96, train_steps=40,
                          batch_size=8, warmup_steps=2)
    model, tokenizer, _ = train_tiny_lm(texts, config, device="cpu", progress=QUIET)
    path = tmp_path_factory.mktemp("base")
    save_pretrained(model, tokenizer, path)
    write_manifest(path, {"embedded": True, "source": "test", "weights_sha256": weights_sha256(path)})
    return path


def sentiment_pairs(n_prompts: int, per_prompt: int, seed: int) -> pd.DataFrame:
    """Pairs whose chosen completion is always positive and rejected always negative."""
    rng = random.Random(seed)
    aspects = ["the lid", "the battery", "the sound", "the price", "the handle", "the screen", "the fabric"]
    fillers = ["", " I use it every day.", " It came in a small box.", " My sister uses it too."]
    rows = []
    for p, prompt in enumerate(generate_openings(n_prompts, seed)):
        for _ in range(per_prompt):
            def completion(words):
                return f" and {rng.choice(aspects)} is {rng.choice(words)}.{rng.choice(fillers)}"
            rows.append({"prompt_id": f"p{p:03d}", "prompt": prompt,
                         "chosen": completion(POSITIVE), "rejected": completion(NEGATIVE)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trained(base_dir):
    pairs = sentiment_pairs(n_prompts=80, per_prompt=4, seed=0)
    pairs.index = pairs.index + 1000      # eval_index must be index labels, not positions
    config = RewardTrainConfig(train_steps=100, batch_size=16, learning_rate=3e-3, eval_fraction=0.25, seed=0)
    model, tokenizer, metrics = train_reward_model(pairs, base_dir, config, progress=QUIET)
    return pairs, model, tokenizer, metrics


def test_training_learns_the_given_preference_on_heldout_prompts(trained):
    pairs, model, _, metrics = trained
    assert metrics["heldout_accuracy"] > 0.8
    assert metrics["loss_curve"][-1] < metrics["loss_curve"][0] - 0.3
    assert metrics["n_train_pairs"] + metrics["n_eval_pairs"] == len(pairs)
    assert metrics["n_eval_pairs"] == len(metrics["eval_index"]) > 0
    # Held-out rows are named by index label and share no prompt with training rows.
    held = pairs.loc[metrics["eval_index"]]
    rest = pairs.drop(index=metrics["eval_index"])
    assert set(held.prompt_id).isdisjoint(rest.prompt_id)
    assert not model.training and next(model.parameters()).device.type == "cpu"


def test_untrained_reward_model_is_a_coin_flip_on_the_base_weights(base_dir):
    pairs = sentiment_pairs(n_prompts=12, per_prompt=2, seed=3)
    model, _, metrics = train_reward_model(pairs, base_dir, RewardTrainConfig(train_steps=0, eval_fraction=0.5),
                                           progress=QUIET)
    # Zero head: every text scores 0, all pairs tie, the held-out loss is exactly log 2.
    assert metrics["heldout_accuracy"] == 0.5
    assert metrics["heldout_loss"] == pytest.approx(math.log(2))
    base, _, _ = load_frozen_base(base_dir)
    for name, tensor in base.transformer.state_dict().items():
        torch.testing.assert_close(model.transformer.state_dict()[name], tensor, rtol=0, atol=0)
    assert model.config.pad_token_id is not None and model.config.num_labels == 1


def test_training_is_seeded(base_dir):
    pairs = sentiment_pairs(n_prompts=10, per_prompt=2, seed=4)
    config = RewardTrainConfig(train_steps=4, batch_size=4, learning_rate=1e-3, seed=7)
    a = train_reward_model(pairs, base_dir, config, progress=QUIET)[2]
    b = train_reward_model(pairs, base_dir, config, progress=QUIET)[2]
    assert a["loss_curve"] == b["loss_curve"] and a["eval_index"] == b["eval_index"]


def test_split_by_prompt_falls_back_to_prompt_text():
    pairs = sentiment_pairs(n_prompts=20, per_prompt=3, seed=5).drop(columns="prompt_id")
    held = split_by_prompt(pairs, 0.2, seed=0)
    assert held.sum() == 4 * 3
    assert set(pairs.prompt[held]).isdisjoint(pairs.prompt[~held])
    assert not split_by_prompt(pairs.iloc[:3], 0.5, seed=0).any()     # one prompt: nothing to hold out


def scorer_inputs():
    prompts = ["I bought this kettle last week", "So I finally tried the lamp", "My new fan arrived early"]
    completions = [" and the lid is great.", ", sadly it broke after a day and I hate the noise.", "Love it!"]
    return prompts, completions


def test_scores_do_not_depend_on_padding_side_or_batch(trained):
    _, model, tokenizer, _ = trained
    prompts, completions = scorer_inputs()
    scorer = RewardScorer(model, tokenizer, batch_size=8)
    left = RewardScorer(model, tokenizer, padding_side="left")(prompts, completions)
    right = scorer(prompts, completions)
    single = [scorer([p], [c])[0] for p, c in zip(prompts, completions)]
    assert len(set(left)) == 3                     # a trained head: scores differ per text
    assert right == pytest.approx(left, abs=1e-5)
    assert single == pytest.approx(left, abs=1e-5)
    # The scorer reads the text join_prompt_completion makes.
    joined = [join_prompt_completion(p, c) for p, c in zip(prompts, completions)]
    assert scorer.score_texts(joined) == pytest.approx(left, abs=1e-6)


def test_truncation_keeps_the_beginning(trained):
    _, model, tokenizer, _ = trained
    prompt = "I bought this kettle last week"
    body = " and the lid is great. I use it every day."
    scorer = RewardScorer(model, tokenizer, max_length=12)
    a, b = scorer([prompt, prompt], [body + " Love it!", body + " Returning it, awful."])
    assert a == pytest.approx(b, abs=1e-6)        # only the tails differ, and they are cut
    ids = encode_texts(tokenizer, [prompt + body], 12)[0]
    assert len(ids) == 12 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # max_length beyond the model's 96 positions is clamped, not an index error.
    long = RewardScorer(model, tokenizer, max_length=10_000)
    assert long.max_length == 96 and math.isfinite(long([prompt], [body * 30])[0])


def test_save_load_round_trip(trained, tmp_path):
    _, model, tokenizer, _ = trained
    prompts, completions = scorer_inputs()
    expected = RewardScorer(model, tokenizer)(prompts, completions)
    save_reward_model(model, tokenizer, tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").exists()
    assert not list((tmp_path / "rm").glob("*.bin")) and not list((tmp_path / "rm").glob("*.pt"))
    loaded = load_reward_model(tmp_path / "rm")
    assert loaded(prompts, completions) == pytest.approx(expected, abs=1e-6)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_loading_a_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-rm"):
        load_reward_model(tmp_path / "no-such-rm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_reward_model(tmp_path / "empty")


def test_gold_ceiling_accuracy_by_hand():
    pairs = pd.DataFrame({
        "prompt": ["I bought it"] * 4,
        "chosen": [" short.", " a b c d e f g h.", " same length", " one two three four five six"],
        "rejected": [" a much longer one here.", " tiny.", " equal words", " one."],
    })
    chosen, rejected = conciseness(pairs.chosen.tolist()), conciseness(pairs.rejected.tolist())
    by_hand = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    assert by_hand == [1.0, 0.0, 0.5, 0.0]
    assert gold_ceiling_accuracy(pairs, "conciseness") == pytest.approx(sum(by_hand) / 4) == 0.375
    with pytest.raises(KeyError, match="unknown reward"):
        gold_ceiling_accuracy(pairs, "helpfulness")


def test_pair_accuracy_ties_count_half():
    assert pair_accuracy([1.0, 2.0, 3.0, 5.0], [0.0, 2.0, 4.0, 5.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert pair_accuracy([0.0, 0.0], [0.0, 0.0]) == 0.5
    with pytest.raises(ValueError):
        pair_accuracy([1.0], [1.0, 2.0])


def test_missing_columns_are_named(base_dir):
    with pytest.raises(ValueError, match="rejected"):
        train_reward_model(pd.DataFrame({"prompt": ["a"], "chosen": ["b"]}), base_dir, RewardTrainConfig())
    mixed = sentiment_pairs(n_prompts=2, per_prompt=2, seed=0).assign(attribute=["positivity", "conciseness"] * 2)
    with pytest.raises(ValueError, match="one reward model per attribute"):
        train_reward_model(mixed, base_dir, RewardTrainConfig())


def tiny_bert_classifier(directory, num_labels=1):
    """A locally saved encoder classifier whose tokenizer adds [CLS] ... [SEP] itself (real-model path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordPieceTrainer(vocab_size=80, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                        show_progress=False)
    tok.train_from_iterator(["i bought this kettle and the lid is great awful love it hate"], trainer)
    specials = [(name, tok.token_to_id(name)) for name in ("[CLS]", "[SEP]")]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


def test_loads_a_user_supplied_encoder_classifier(tmp_path):
    tokenizer = tiny_bert_classifier(tmp_path / "bert")
    scorer = load_reward_model(tmp_path / "bert")
    prompts, completions = ["i bought this kettle", "i bought it"], [" and the lid is great", " awful"]
    batch = scorer(prompts, completions)
    assert batch == pytest.approx([scorer([p], [c])[0] for p, c in zip(prompts, completions)], abs=1e-6)
    # The tokenizer's own framing, cut at max_length with [SEP] kept.
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = encode_texts(tokenizer, ["i love it and it is great great great"], 5)[0]
    assert len(ids) == 5 and ids[0] == cls and ids[-1] == sep
    tiny_bert_classifier(tmp_path / "two", num_labels=2)
    with pytest.raises(ValueError, match="num_labels=1"):
        load_reward_model(tmp_path / "two")


def test_training_batches_cover_every_pair_once_per_pass_with_less_padding():
    from models.rewards.reward_model import _batches

    lengths = [random.Random(i).randint(5, 90) for i in range(50)]

    def one_pass(pool):
        # 50 pairs in batches of 4: 12 full batches and one of 2, however they are grouped.
        batches = _batches(lengths, 4, torch.Generator().manual_seed(0), pool=pool)
        return [next(batches) for _ in range(13)]

    grouped, plain = one_pass(3), one_pass(1)
    assert sorted(i for b in grouped for i in b) == list(range(50))
    assert sorted(i for b in plain for i in b) == list(range(50))

    def width(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert width(grouped) < 0.85 * width(plain)
