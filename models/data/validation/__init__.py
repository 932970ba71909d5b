"""Validation of prompts and preference pairs with Great Expectations, and quarantine of bad rows.

Two kinds of table are checked:

- prompts: ``prompt_id``, ``split`` (train/eval), ``prompt``;
- preference pairs: ``prompt``, ``chosen``, ``rejected``; optional ``attribute``, ``pair_id``,
  ``prompt_id``.

The checks run as a Great Expectations (Core 1.x) suite on an ephemeral context, one per process.
GX cannot look at everything directly (it hashes the frame, so text holding undecodable bytes
would make it raise, and it has no "is valid UTF-8" or "not equal" expectation), so the suite runs
on a *prepared* copy of the frame: each checked column holds a hashable, UTF-8-clean version of
its values, and derived columns hold what GX lacks (``chosen__is_text``, ``chosen__utf8``,
``chosen__stripped``, ...). Each failed expectation's ``unexpected_index_list`` maps back to the
source file's 1-based row, so every problem names file, row, column and reason.

Bad rows of an imported file go to a quarantine CSV with their reasons; the raw file is never
written to. Nothing here imports dagster, and great_expectations is imported lazily.

One concern per module: ``report`` (problems and reports), ``text`` (UTF-8 and text helpers),
``readers`` (CSV, JSONL, Parquet), ``gx`` (the Great Expectations adapter), ``suite`` (the
prepared frame and its checks), ``rules`` (what each table must satisfy), ``quarantine``
(importing a file: bad rows out, good rows on).
"""

from models.data.validation.quarantine import (
                                          check_file,
                                          import_preference_file,
                                          import_prompt_file,
                                          quarantine_path,
                                          split_quarantine,
                                          write_quarantine,
)
from models.data.validation.readers import CSV_SUFFIXES, JSONL_SUFFIXES, PARQUET_SUFFIXES, detect_kind, read_table
from models.data.validation.report import Problem, ValidationReport
from models.data.validation.rules import (
                                          PAIR_OUTPUT_COLUMNS,
                                          PAIR_REQUIRED,
                                          PROMPT_COLUMNS,
                                          SPLITS,
                                          ValidationRules,
                                          validate_pairs,
                                          validate_prompts,
                                          validate_rollouts,
)
from models.data.validation.text import printable, prompt_id_for

__all__ = [
    "CSV_SUFFIXES", "JSONL_SUFFIXES", "PARQUET_SUFFIXES", "PAIR_OUTPUT_COLUMNS", "PAIR_REQUIRED", "PROMPT_COLUMNS",
    "SPLITS", "Problem", "ValidationReport", "ValidationRules", "check_file", "detect_kind",
    "import_preference_file", "import_prompt_file", "printable", "prompt_id_for", "quarantine_path", "read_table",
    "split_quarantine", "validate_pairs", "validate_prompts", "validate_rollouts", "write_quarantine",
]
