"""The rules: what a prompts, preference-pairs or rollouts table must satisfy, and the suites
that check them. Validation never raises on bad data; it reports problems."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import pandas as pd

from models.data.validation.report import ValidationReport
from models.data.validation.suite import Suite
from models.data.validation.text import printable
from models.rewards.rewards import GOLD_REWARDS

PROMPT_COLUMNS = ("prompt_id", "split", "prompt")
PAIR_REQUIRED = ("prompt", "chosen", "rejected")
PAIR_OUTPUT_COLUMNS = ("pair_id", "attribute", "prompt_id", "prompt", "chosen", "rejected")
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class ValidationRules:
    min_text_chars: int = 1
    max_prompt_chars: int = 400
    max_completion_chars: int = 2000
    min_attribute_share: float = 0.1  # each attribute present holds >= this share of pairs
    known_attributes: tuple[str, ...] = tuple(GOLD_REWARDS)  # allowed attribute values
    default_attribute: str = "positivity"  # used when an imported pairs file has no attribute column

    @classmethod
    def from_params(cls, params: Mapping) -> "ValidationRules":
        """Build rules from a params mapping (e.g. params.yaml `validation`); unknown keys are ignored."""
        casts: dict[str, Callable[[Any], Any]] = {
            "min_text_chars": int,
            "max_prompt_chars": int,
            "max_completion_chars": int,
            "min_attribute_share": float,
            "known_attributes": lambda v: (v,) if isinstance(v, str) else tuple(str(a) for a in v),
            "default_attribute": str,
        }
        kwargs = {f.name: casts[f.name](params[f.name]) for f in fields(cls)
                  if f.name in params and params[f.name] is not None}
        return cls(**kwargs)


def validate_prompts(df: pd.DataFrame, source: str, rules: ValidationRules,
                     ids_from_text: bool = False) -> ValidationReport:
    """Prompts: prompt_id (unique), split in {train, eval}, prompt (non-empty UTF-8 text of at most
    rules.max_prompt_chars characters). With ids_from_text (ids made from the prompt text), a
    duplicate id is reported as a duplicate prompt. Never raises on bad data."""
    suite = Suite(df)
    suite.has_rows()
    if suite.column("prompt_id"):
        suite.identifier("prompt_id", derived_from="prompt" if ids_from_text else None)
    if suite.column("split"):
        suite.in_set("split", SPLITS, "split")
    if suite.column("prompt"):
        suite.text("prompt", max_chars=rules.max_prompt_chars, min_chars=rules.min_text_chars)
    report = suite.run(source, "prompts")
    if "split" in suite.present:
        split = suite.series["split__text"]
        report.statistics["split_counts"] = {s: int((split == s).sum()) for s in SPLITS}
    report.finish()
    return report


def validate_pairs(df: pd.DataFrame, source: str, rules: ValidationRules,
                   distinct: bool = False) -> ValidationReport:
    """Preference pairs: prompt, chosen, rejected (non-empty UTF-8 text within the length bounds,
    chosen != rejected); if present, pair_id unique, prompt_id set, attribute known and each
    attribute at least rules.min_attribute_share of the pairs. Never raises on bad data.

    With distinct (a file being imported), a row that repeats an earlier row's prompt, chosen,
    rejected and attribute verbatim is a problem on the repeat: the same pair twice would weigh
    double in the reward model. The same pair for another attribute is not a repeat. Synthesized
    pairs are not held to this: two samples may agree by chance, and that is the model's
    distribution, not a delivery error."""
    suite = Suite(df)
    suite.has_rows()
    texts = {}
    for column, limit in (("prompt", rules.max_prompt_chars), ("chosen", rules.max_completion_chars),
                          ("rejected", rules.max_completion_chars)):
        texts[column] = suite.column(column)
        if texts[column]:
            suite.text(column, max_chars=limit, min_chars=rules.min_text_chars)
    if texts["chosen"] and texts["rejected"]:
        suite.differ("chosen", "rejected")
    if suite.column("pair_id", required=False):
        suite.identifier("pair_id")
    if suite.column("prompt_id", required=False):
        suite.is_id("prompt_id")  # many pairs per prompt: only its type is checked
    counts = None
    if suite.column("attribute", required=False):
        suite.in_set("attribute", tuple(rules.known_attributes), "attribute")
        counts = suite.shares("attribute", tuple(rules.known_attributes), rules.min_attribute_share)
    if distinct and all(texts.values()):
        pair = PAIR_REQUIRED + (("attribute",) if "attribute" in suite.present else ())
        suite.first_occurrences(pair, "pair")
    report = suite.run(source, "pairs")
    if counts is not None:
        total = sum(n for a, n in counts.items() if a in rules.known_attributes)
        report.statistics["attribute_counts"] = {printable(a): n for a, n in sorted(counts.items())}
        report.statistics["attribute_shares"] = {a: counts[a] / total for a in sorted(counts)
                                                 if a in rules.known_attributes and total}
    report.finish()
    return report


def validate_rollouts(df: pd.DataFrame, source: str, expected_rows: int | None = None) -> ValidationReport:
    """Rollouts: non-empty completions, finite reward scores (every learned_/gold_ column), at least
    one token per sample, and, when given, exactly expected_rows rows. Never raises on bad data."""
    suite = Suite(df)
    suite.has_rows()
    if expected_rows is not None:
        suite.row_count(expected_rows)
    suite.column("prompt_id")
    if suite.column("completion"):
        suite.text("completion", min_chars=1)
    for column in [c for c in df.columns if c.startswith(("learned_", "gold_"))] + ["n_tokens"]:
        if suite.column(column):
            suite.finite(column)
    report = suite.run(source, "rollouts")
    report.finish()
    return report
