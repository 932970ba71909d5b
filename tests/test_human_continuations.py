"""Human continuations as value-training data (models/data/human_continuations.py): rollout-shaped rows
of each snippet's opening and the first tokens of its own rest, never an eval snippet's."""

import pandas as pd
import pytest

from models.data.human_continuations import human_continuations, scored_human_continuations
from models.data.rollouts import training_rollouts

WORDS = "<pad> <eos> <bos> the film was a very good and fun bad plot dull camera work".split()


@pytest.fixture(scope="module")
def tokenizer(word_tokenizer):
    return word_tokenizer({w: i for i, w in enumerate(WORDS)}, bos="<bos>")


def usable() -> pd.DataFrame:
    return pd.DataFrame({
        "snippet_id": ["movie-1", "movie-2", "amazon-3", "movie-4"],
        "opening": ["the film was", "the plot was", "the camera work", "a film"],
        "rest": [" very good and fun", " dull", " was bad bad bad bad", " was good"],
        "split": ["train", "eval", "", ""],
    })


def test_rows_are_the_opening_and_the_first_tokens_of_its_own_rest(tokenizer):
    ids = {w: i for i, w in enumerate(WORDS)}
    df = human_continuations(usable(), tokenizer, max_new_tokens=3, exclude={"movie-2"})
    assert df.prompt_id.tolist() == ["human-movie-1", "human-amazon-3", "human-movie-4"]
    assert df.prompt_ids.tolist() == [[ids["<bos>"], ids["the"], ids["film"], ids["was"]],
                                      [ids["<bos>"], ids["the"], ids["camera"], ids["work"]],
                                      [ids["<bos>"], ids["a"], ids["film"]]]
    # cut at the token budget: "very good and" of "very good and fun"
    assert df.completion_ids.tolist() == [[ids["very"], ids["good"], ids["and"]],
                                          [ids["was"], ids["bad"], ids["bad"]],
                                          [ids["was"], ids["good"]]]
    assert df.completion.tolist() == ["very good and", "was bad bad", "was good"]
    assert df.n_tokens.tolist() == [3, 3, 2]
    assert not df.finished.any()


def test_excluded_snippets_never_appear_and_a_subset_is_seeded(tokenizer):
    full = human_continuations(usable(), tokenizer, max_new_tokens=8, exclude={"movie-2"})
    assert "human-movie-2" not in set(full.prompt_id)
    a = human_continuations(usable(), tokenizer, max_new_tokens=8, n=2, seed=5, exclude={"movie-2"})
    b = human_continuations(usable(), tokenizer, max_new_tokens=8, n=2, seed=5, exclude={"movie-2"})
    assert len(a) == 2 and a.prompt_id.tolist() == b.prompt_id.tolist()
    assert set(a.prompt_id) <= set(full.prompt_id)
    assert human_continuations(usable(), tokenizer, max_new_tokens=8, n=0).empty


def test_as_training_data_no_human_continuation_ends_with_eos(tokenizer):
    df = human_continuations(usable(), tokenizer, max_new_tokens=8).assign(learned_positivity=[1.0, 0.0, -1.0, 3.0])
    data = training_rollouts(df, "learned_positivity", tokenizer.eos_token_id, {"mean": 1.0, "std": 2.0})
    assert data.action_ids == df.completion_ids.tolist()
    assert tokenizer.eos_token_id not in sum(data.action_ids, [])
    assert data.rewards == [0.0, -0.5, -1.0, 1.0]
    assert data.groups == df.prompt_id.tolist()


def test_bad_input_is_refused(tokenizer):
    with pytest.raises(ValueError, match="missing \\['rest'\\]"):
        human_continuations(usable().drop(columns="rest"), tokenizer, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        human_continuations(usable(), tokenizer, max_new_tokens=0)
    with pytest.raises(ValueError, match="n must be"):
        human_continuations(usable(), tokenizer, max_new_tokens=4, n=-1)


def test_scored_rows_leave_the_eval_split_out_and_carry_each_scorers_reward(tokenizer):
    def length(prompts, completions):
        return [float(len(c.split())) for c in completions]

    df = scored_human_continuations(usable(), tokenizer, max_new_tokens=8, scorers={"positivity": length})
    assert df.prompt_id.tolist() == ["human-movie-1", "human-amazon-3", "human-movie-4"]   # movie-2 is eval
    assert df.learned_positivity.tolist() == [4.0, 5.0, 2.0]
    with pytest.raises(ValueError, match="split"):
        scored_human_continuations(usable().drop(columns="split"), tokenizer, 8, {"positivity": length})
