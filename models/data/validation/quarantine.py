"""Quarantine: a file read and validated as an import does it, its bad rows written with their
reasons to a quarantine CSV, its good rows returned normalized. The raw file is never written to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from models.artifacts import file_md5, write_csv
from models.data.validation.readers import ROW, detect_kind, read_table, source_rows
from models.data.validation.report import Problem, ValidationReport
from models.data.validation.rules import (
    PAIR_OUTPUT_COLUMNS,
    PROMPT_COLUMNS,
    SPLITS,
    ValidationRules,
    validate_pairs,
    validate_prompts,
)
from models.data.validation.text import printable, prompt_id_for

_KINDS = {"prompts": "prompts", "prompt": "prompts", "pairs": "pairs", "preference_pairs": "pairs",
          "preferences": "pairs"}


def split_quarantine(df: pd.DataFrame, report: ValidationReport) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Good rows (without `_row`) and bad rows (the original columns plus `source_row` and
    `reason`, all reasons of the row joined by "; "). After a fatal problem (a missing required
    column) no row is good. Dataset-level problems (e.g. attribute share) quarantine no row."""
    good, bad = _split(df, report)
    return good.drop(columns=[ROW], errors="ignore"), bad


def _split(df: pd.DataFrame, report: ValidationReport) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(good rows, keeping `_row`; bad rows with source_row and reason)."""
    rows = source_rows(df)
    reasons: dict[int, list[str]] = {}
    for p in report.problems:
        if p.row is not None:
            reasons.setdefault(int(p.row), []).append(p.reason if p.column is None else f"{p.column}: {p.reason}")
    if report.fatal:
        # The file as a whole is unusable: every row goes to quarantine, with the file's reasons.
        file_reason = "; ".join(f"{p.column}: {p.reason}" if p.column else p.reason
                                for p in report.problems if p.row is None)
        bad_mask = np.ones(len(df), dtype=bool)
        row_reason = {int(r): "; ".join(filter(None, [file_reason, *reasons.get(int(r), [])])) for r in rows}
    else:
        bad_mask = np.isin(rows, list(reasons)) if reasons else np.zeros(len(df), dtype=bool)
        row_reason = {r: "; ".join(v) for r, v in reasons.items()}
    good = df.loc[~bad_mask].reset_index(drop=True)
    original = [c for c in df.columns if c != ROW]
    bad = df.loc[bad_mask, original].reset_index(drop=True)
    bad_rows = rows[bad_mask]
    bad["source_row"] = bad_rows.astype("int64")
    bad["reason"] = [row_reason[int(r)] for r in bad_rows]
    return good, bad


def _printable_frame(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = [printable(v) if isinstance(v, str) else v for v in out[column]]
    out.columns = [printable(str(c)) for c in out.columns]
    return out


def quarantine_path(path, quarantine_dir) -> Path:
    """quarantine_dir/<stem>-<first 8 hex of the raw file's md5>.csv"""
    path = Path(path)
    return Path(quarantine_dir) / f"{path.stem}-{file_md5(path)[:8]}.csv"


def write_quarantine(bad: pd.DataFrame, path, quarantine_dir) -> Path | None:
    """Write bad rows (atomically) next to none of the raw data; None when there are none.
    Undecodable bytes are written as \\xNN escapes so the CSV itself is valid UTF-8."""
    if bad.empty:
        return None
    return write_csv(_printable_frame(bad), quarantine_path(path, quarantine_dir))


def _check_file(path, kind: str | None, rules: ValidationRules) -> tuple[pd.DataFrame, ValidationReport, dict]:
    """Read and validate a file the way an import does. Returns the frame as validated (with any
    filled-in columns), the report (reading problems included) and what was filled in."""
    source = str(path)
    df, read_problems = read_table(path)
    if kind is not None and kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected 'prompts' or 'pairs'")
    kind = _KINDS[kind] if kind is not None else detect_kind(df)
    filled: dict[str, str] = {}
    data_columns = [c for c in df.columns if c != ROW]
    if not data_columns and any(p.row is None for p in read_problems):
        report = ValidationReport(source, kind, len(df), list(read_problems), [], {},
                                  rows=tuple(int(r) for r in source_rows(df)))
        report.finish()
        return df, report, filled
    if kind == "pairs":
        if "attribute" not in df.columns:
            df["attribute"] = rules.default_attribute
            filled["attribute"] = f"default_attribute {rules.default_attribute!r}"
        report = validate_pairs(df, source, rules, distinct=True)
    else:
        if "prompt_id" not in df.columns and "prompt" in df.columns:
            df["prompt_id"] = [prompt_id_for(v) if isinstance(v, str) else f"row-{r}"
                               for v, r in zip(df["prompt"], source_rows(df))]
            filled["prompt_id"] = "hash of the prompt text"
        if "split" not in df.columns:
            df["split"] = "train"  # provisional; an import draws the seeded eval split afterwards
            filled["split"] = "seeded eval split"
        report = validate_prompts(df, source, rules, ids_from_text="prompt_id" in filled)
    # A row that could not be parsed gets one reason, not one "missing value" per column.
    unreadable = {p.row for p in read_problems if p.row is not None and p.column is None}
    report.problems = list(read_problems) + [p for p in report.problems if p.row not in unreadable]
    report.statistics["filled_columns"] = filled
    report.finish()
    return df, report, filled


def check_file(path, kind: str | None = None, rules: ValidationRules | None = None,
               quarantine_dir=None) -> tuple[ValidationReport, int, Path | None]:
    """What `vas validate` reports: the file read and validated as an import would (kind None:
    told by its columns), and with quarantine_dir its bad rows written there. Returns the report,
    the number of bad rows and the quarantine file (None when none was written). Raises
    FileNotFoundError or ValueError for a file that cannot be read as a table at all."""
    df, report, _ = _check_file(path, kind, rules or ValidationRules())
    _, bad = _split(df, report)
    written = write_quarantine(bad, path, quarantine_dir) if quarantine_dir is not None else None
    return report, len(bad), written


def _as_text(values) -> list[str]:
    return [v if isinstance(v, str) else str(v) for v in values]


def import_preference_file(path, rules: ValidationRules, quarantine_dir
                           ) -> tuple[pd.DataFrame, ValidationReport, Path | None]:
    """Read, validate and quarantine a preference file (CSV, JSONL or Parquet with prompt, chosen,
    rejected[, attribute, pair_id, prompt_id]).

    Returns the good rows as (pair_id, attribute, prompt_id, prompt, chosen, rejected): a missing
    attribute column is filled with rules.default_attribute, a missing pair_id becomes
    "imp-<source row>", a missing prompt_id the hash of the prompt text. Bad rows (a verbatim
    repeat of an earlier pair among them) go to quarantine_dir/<stem>-<md5[:8]>.csv with
    `source_row` and `reason`; the path is None when no row was bad. Dataset-level problems
    quarantine nothing but keep report.success False.
    """
    df, report, _ = _check_file(path, "pairs", rules)
    good, bad = _split(df, report)
    quarantined = write_quarantine(bad, path, quarantine_dir)
    if len(good):
        out = pd.DataFrame({
            "pair_id": _as_text(good["pair_id"]) if "pair_id" in good.columns
            else [f"imp-{int(r):06d}" for r in good[ROW]],
            "attribute": _as_text(good["attribute"]),
            "prompt_id": _as_text(good["prompt_id"]) if "prompt_id" in good.columns
            else [prompt_id_for(t) for t in good["prompt"]],
            "prompt": _as_text(good["prompt"]),
            "chosen": _as_text(good["chosen"]),
            "rejected": _as_text(good["rejected"]),
        })
    else:
        out = pd.DataFrame({c: pd.Series([], dtype="str") for c in PAIR_OUTPUT_COLUMNS})
    report.statistics["n_good_rows"] = len(out)
    report.statistics["n_quarantined"] = len(bad)
    return out, report, quarantined


def import_prompt_file(path, rules: ValidationRules, quarantine_dir, n_eval: int, seed: int
                       ) -> tuple[pd.DataFrame, ValidationReport, Path | None]:
    """Read, validate and quarantine a prompts file (needs `prompt`; prompt_id and split optional).

    A missing prompt_id becomes the hash of the prompt text (so duplicate prompts are reported as
    duplicates); a missing split becomes a seeded draw of n_eval eval rows among the good rows,
    the rest train. Returns (prompt_id, split, prompt) rows, the report and the quarantine path
    (None when no row was bad).
    """
    df, report, filled = _check_file(path, "prompts", rules)
    good, bad = _split(df, report)
    quarantined = write_quarantine(bad, path, quarantine_dir)
    if len(good):
        out = pd.DataFrame({
            "prompt_id": _as_text(good["prompt_id"]),
            "split": _as_text(good["split"]),
            "prompt": _as_text(good["prompt"]),
        })
    else:
        out = pd.DataFrame({c: pd.Series([], dtype="str") for c in PROMPT_COLUMNS})
    if "split" in filled and len(out):
        n_eval = max(0, int(n_eval))
        split = np.array(["train"] * len(out), dtype=object)
        eval_idx = np.random.default_rng(seed).choice(len(out), size=min(n_eval, len(out)), replace=False)
        split[eval_idx] = "eval"
        out["split"] = split.tolist()
        if n_eval and len(out) <= n_eval:
            report.problems.insert(0, Problem(
                str(path), None, "split",
                f"only {len(out)} valid prompts: n_eval={n_eval} eval prompts leave none for training"))
    if len(out):
        report.statistics["split_counts"] = {s: int((out["split"] == s).sum()) for s in SPLITS}
    report.statistics["n_good_rows"] = len(out)
    report.statistics["n_quarantined"] = len(bad)
    report.finish()
    return out, report, quarantined
