"""Human continuations as value-training data: every prefix of a human-written snippet, labelled
by the learned reward of the whole text (off-policy Monte-Carlo targets).

A value model of pi0 is fitted to pi0's own rollouts, and on a 2-core machine those are few: the
real profile samples 8 continuations of 192 openings. The human-rated snippets hold thousands of
distinct openings, each with the continuation a person wrote, for the price of one reward-model
forward each. RAD (Deng and Raffel 2023) trains its prefix scorer this way, on labelled human text
rather than the model's samples. The target is then E_human[R | prefix] rather than E_pi0[R |
prefix], a bias this module does not hide: the bench and the evaluation measure whether the extra
prompts buy more ranking than the bias costs.

The rows have sample_rollouts' shape (prompt_id, prompt, completion, prompt_ids, completion_ids,
finished), so `models.data.rollouts.training_rollouts` turns them into the same training data. A human
continuation is cut at the rollouts' token budget and never counts as ended: a person's sentence
ending is not pi0's EOS.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import pandas as pd

from models.lm.sampling import encode_prompts


def human_continuations(usable: pd.DataFrame, tokenizer, max_new_tokens: int, n: int | None = None,
                        seed: int = 0, exclude: set[str] | frozenset[str] = frozenset()) -> pd.DataFrame:
    """Rollout-shaped rows of human continuations: each snippet's opening as the prompt and the
    first max_new_tokens tokens of its rest as the completion.

    usable: models.data.human_snippets.usable_snippets' frame (snippet_id, opening, rest, ...). Snippets
    whose id is in `exclude` (the eval prompts' snippets) are never used; n picks a seeded subset
    (None: all). A rest that tokenizes to nothing is dropped."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    missing = {"snippet_id", "opening", "rest"} - set(usable.columns)
    if missing:
        raise ValueError(f"human continuations need the columns snippet_id, opening and rest; missing {sorted(missing)}")
    pool = usable[~usable.snippet_id.astype(str).isin(set(exclude))].reset_index(drop=True)
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        pick = np.sort(np.random.default_rng(seed).permutation(len(pool))[:n])
        pool = pool.iloc[pick].reset_index(drop=True)
    rests = tokenizer(pool.rest.tolist(), add_special_tokens=False)["input_ids"] if len(pool) else []
    completion_ids = [list(ids[:max_new_tokens]) for ids in rests]
    keep = np.array([len(ids) > 0 for ids in completion_ids], dtype=bool)
    pool = pool[keep].reset_index(drop=True)
    completion_ids = [ids for ids, k in zip(completion_ids, keep) if k]
    return pd.DataFrame({
        "prompt_id": "human-" + pool.snippet_id.astype(str),
        "prompt": pool.opening,
        "completion": tokenizer.batch_decode(completion_ids) if completion_ids else [],
        "prompt_ids": encode_prompts(tokenizer, pool.opening.tolist()) if len(pool) else [],
        "completion_ids": completion_ids,
        "finished": np.zeros(len(pool), dtype=bool),
        "n_tokens": np.array([len(ids) for ids in completion_ids], dtype=np.int64),
    })


def scored_human_continuations(snippets: pd.DataFrame, tokenizer, max_new_tokens: int,
                               scorers: Mapping[str, Callable], n: int | None = None, seed: int = 0) -> pd.DataFrame:
    """human_continuations of every snippet outside the eval split (snippets: the prompts asset's
    human_snippets.parquet, with its `split` column), with learned_<attribute> from each scorer
    (prompts, completions -> rewards), as the rollouts are scored."""
    if "split" not in snippets.columns:
        raise ValueError("scored human continuations need the snippets' split column, to leave the eval ones out")
    rows = human_continuations(snippets, tokenizer, max_new_tokens, n=n, seed=seed,
                               exclude=set(snippets.snippet_id[snippets.split == "eval"]))
    for attribute, scorer in scorers.items():
        rows[f"learned_{attribute}"] = scorer(rows.prompt.tolist(), rows.completion.tolist())
    return rows
