"""The real profile's prompts: human-rated review snippets from the pinned vaderSentiment sdist
(`make setup` fetches it to .cache/sources/), cut into openings, and VADER's agreement with the
human ratings."""

import io
import tarfile

import pandas as pd
import pytest

from models.data.human_snippets import (
    ARCHIVE,
    GROUND_TRUTH,
    SDIST_NAME,
    SnippetPromptConfig,
    _parse,
    continuation_triples,
    gold_agreement,
    opening,
    read_snippets,
    rest,
    snippet_prompts,
    usable_snippets,
)
from models.profiles import PROJECT_ROOT

SDIST = PROJECT_ROOT / ".cache" / "sources" / SDIST_NAME


@pytest.fixture(scope="module")
def snippets():
    if not SDIST.exists():
        pytest.fail(f"{SDIST} is missing: `make setup` fetches it from the package registry")
    return read_snippets(SDIST)


def test_the_pinned_sdist_holds_the_human_rated_movie_and_product_snippets(snippets):
    counts = snippets.groupby("corpus").size().to_dict()
    assert counts == {"movie": 10605, "amazon": 3708}
    assert snippets.snippet_id.is_unique
    assert snippets.human_rating.between(-4, 4).all() and snippets.text.str.len().gt(0).all()
    first = snippets[snippets.snippet_id == "movie-3"].iloc[0]
    assert (first.text, first.human_rating) == ("Effective but too tepid biopic", -0.6)   # no CR left over


def _fake_sdist(path, ground_truth: dict[str, bytes]):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for name, data in ground_truth.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(ARCHIVE)
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_another_file_is_refused_and_bad_rows_are_named(tmp_path):
    good = {GROUND_TRUTH["movie"]: b"1\t2.5\tA fine film indeed.\r\n",
            GROUND_TRUTH["amazon"]: b"1_1\t-1.0\tit broke.\r\n"}
    fake = _fake_sdist(tmp_path / SDIST_NAME, good)
    with pytest.raises(ValueError, match="not the pinned"):
        read_snippets(fake)
    rows = read_snippets(fake, expected_sha256=None)                     # unpinned: read as any copy
    assert rows.snippet_id.tolist() == ["movie-1", "amazon-1_1"] and rows.human_rating.tolist() == [2.5, -1.0]
    with pytest.raises(ValueError, match=r"x\.txt, line 2, column 2 \(rating\): 'high' is not a number"):
        _parse("1\t1.0\tok\r\n2\thigh\tbad\r\n", "movie", "x.txt")
    with pytest.raises(ValueError, match=r"x\.txt, line 1: expected 3 tab-separated columns"):
        _parse("1\t1.0\n", "movie", "x.txt")
    with pytest.raises(ValueError, match=r"line 1, column 2 \(rating\): 9.0 is outside"):
        _parse("1\t9\ttoo glowing\n", "movie", "x.txt")
    with pytest.raises(FileNotFoundError, match="make setup"):
        read_snippets(tmp_path / "missing.tar.gz")


def test_prompts_are_seeded_openings_balanced_across_corpora_and_splits(snippets):
    config = SnippetPromptConfig(n_train=20, n_eval=7, opening_words=5, min_rest_words=3, seed=4)
    prompts = snippet_prompts(snippets, config)
    assert len(prompts) == 27 and prompts.prompt_id.is_unique
    assert prompts.groupby(["split", "corpus"]).size().to_dict() == {
        ("eval", "amazon"): 4, ("eval", "movie"): 3, ("train", "amazon"): 10, ("train", "movie"): 10}
    for row in prompts.itertuples():
        assert row.prompt == opening(row.snippet, 5) and row.snippet.startswith(row.prompt.split()[0])
        assert len(row.prompt.split()) == 5 and len(row.snippet.split()) >= 8
    pd.testing.assert_frame_equal(prompts, snippet_prompts(snippets, config))          # seeded
    assert snippet_prompts(snippets, SnippetPromptConfig(n_train=20, n_eval=7, seed=5)).prompt_id.tolist() \
        != prompts.prompt_id.tolist()
    with pytest.raises(ValueError, match="usable ones left"):
        snippet_prompts(snippets, SnippetPromptConfig(n_train=8000, n_eval=0))


def test_continuation_pairs_are_human_openings_and_two_other_snippets_rests(snippets):
    usable = usable_snippets(snippets, SnippetPromptConfig(opening_words=5, min_rest_words=3))
    assert (usable.text.str.split().str.len() >= 8).all()
    for row in usable.head(50).itertuples():   # the opening and the rest are the snippet, cut once
        assert (row.opening + row.rest).split() == row.text.split() and row.rest.startswith(" ")
    assert rest("one two three", 1) == " two three" and rest("one two", 2) == ""

    triples = continuation_triples(usable, 200, seed=3)
    by_id = usable.set_index("snippet_id")
    openings, rests = set(usable.opening), dict(zip(usable.rest, usable.snippet_id))
    assert len(triples) == 200 and set(triples.text_a) <= set(rests) and set(triples.text_b) <= set(rests)
    for row in triples.itertuples():
        assert row.prompt == by_id.loc[row.prompt_id, "opening"] and row.prompt in openings
        assert len({row.prompt_id, rests[row.text_a], rests[row.text_b]}) == 3     # three distinct snippets
    pd.testing.assert_frame_equal(triples, continuation_triples(usable, 200, seed=3))   # seeded
    assert not triples.equals(continuation_triples(usable, 200, seed=4))
    with pytest.raises(ValueError, match="at least 3 usable snippets"):
        continuation_triples(usable.head(2), 5, seed=0)


def test_snippet_pairs_are_labelled_by_the_same_bradley_terry_rater():
    from models.data.preferences import PairSynthesisConfig, snippet_pairs
    from models.rewards.rewards import positivity

    triples = pd.DataFrame({"prompt_id": ["m-1", "m-2", "m-3"], "prompt": ["The film", "This phone", "Its plot"],
                            "text_a": [" is wonderful and great.", " broke.", " is dull, awful and bad."],
                            "text_b": [" is awful.", " is great, I love it!", " is superb."]})
    sharp = PairSynthesisConfig(bt_scale={"positivity": 1e-6})   # a rater that never errs
    pairs = snippet_pairs(triples, "positivity", sharp)
    assert pairs.chosen.tolist() == [" is wonderful and great.", " is great, I love it!", " is superb."]
    assert (pairs.gold_chosen > pairs.gold_rejected).all() and set(pairs.origin) == {"human_snippets"}
    assert pairs.gold_chosen.tolist() == positivity(pairs.chosen.tolist())
    assert pairs.prompt.tolist() == triples.prompt.tolist() and pairs.pair_id.is_unique
    # A coin-flip rater (huge scale) still labels every pair, chosen or not by its draw.
    noisy = snippet_pairs(triples, "positivity", PairSynthesisConfig(bt_scale={"positivity": 1e6}))
    assert sorted([*noisy.chosen, *noisy.rejected]) == sorted([*triples.text_a, *triples.text_b])
    # An identical or empty continuation carries no preference and is dropped.
    same = triples.assign(text_b=[" is wonderful and great.", " ", " is superb."])
    assert snippet_pairs(same, "positivity", sharp).prompt_id.tolist() == ["m-3"]


def test_gold_agreement_is_the_spearman_rank_correlation_per_corpus():
    frame = pd.DataFrame({"corpus": ["a", "a", "a", "b", "b", "b"],
                          "human_rating": [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]})
    # corpus a ranks the same; corpus b reversed: rank correlations 1 and -1. Overall: ranks of
    # the gold (1, 3, 5, 6, 4, 2) against the tied human ranks (1.5, 3.5, 5.5, 1.5, 3.5, 5.5).
    out = gold_agreement(frame, [0.1, 0.3, 0.5, 0.6, 0.4, 0.2])
    assert out["spearman_a"] == pytest.approx(1.0) and out["spearman_b"] == pytest.approx(-1.0)
    gold_ranks = pd.Series([1, 3, 5, 6, 4, 2], dtype=float)
    human_ranks = pd.Series([1.5, 3.5, 5.5, 1.5, 3.5, 5.5])
    assert out["spearman"] == pytest.approx(gold_ranks.corr(human_ranks))
    assert (out["n"], out["n_a"], out["n_b"]) == (6, 3, 3)


def test_vader_agrees_with_the_human_raters_as_published(snippets):
    # Hutto & Gilbert report VADER's correlation with these raters at about 0.45 (movie) to 0.6
    # (product): the gold is informative but far from the humans.
    from models.rewards.rewards import positivity

    out = gold_agreement(snippets, positivity(snippets.text.tolist()))
    assert 0.35 < out["spearman_movie"] < 0.55 and 0.5 < out["spearman_amazon"] < 0.7


def test_the_pairs_asset_never_pairs_an_eval_prompts_snippet_and_says_what_it_needs(tmp_path):
    import logging
    from types import SimpleNamespace

    from assets.synthesis import HUMAN_SNIPPETS, _snippet_pairs
    from models.data.preferences import PairSynthesisConfig

    run = SimpleNamespace(path=lambda asset: tmp_path / asset, log=logging.getLogger("test"))
    config = PairSynthesisConfig(snippet_pairs={"positivity": 60})
    with pytest.raises(ValueError, match=r"snippet_pairs .* needs prompts cut from human-rated snippets"):
        _snippet_pairs(run, config)
    texts = ["a great fine film", "a dull bad plot", "the best phone ever", "it broke so sad",
             "an awful mess here", "a lovely warm story", "one fine day indeed"]
    usable = usable_snippets(pd.DataFrame({"snippet_id": [f"s{i}" for i in range(7)], "corpus": "movie",
                                           "human_rating": 0.0, "text": texts}),
                             SnippetPromptConfig(opening_words=1, min_rest_words=1))
    usable["split"] = ["eval", "eval", "eval", "train", "", "", ""]
    (tmp_path / "prompts").mkdir()
    usable.to_parquet(tmp_path / "prompts" / HUMAN_SNIPPETS)
    pairs = _snippet_pairs(run, config)
    assert 0 < len(pairs) <= 60 and set(pairs.origin) == {"human_snippets"}
    assert set(pairs.prompt_id) <= {"s3", "s4", "s5", "s6"}
    eval_rests = set(usable.rest[usable.split == "eval"])
    assert not eval_rests & set(pairs.chosen) and not eval_rests & set(pairs.rejected)
    with pytest.raises(ValueError, match="'tone', which is not one of preference_pairs.attributes"):
        _snippet_pairs(run, PairSynthesisConfig(snippet_pairs={"tone": 5}))
