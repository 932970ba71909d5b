"""The suite: builds the prepared frame GX validates and the checks (expectations) run on it."""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import pandas as pd

from models.data.validation.gx import Check, collect, gx, run_suite
from models.data.validation.readers import source_rows
from models.data.validation.report import Problem, ValidationReport
from models.data.validation.text import clean, is_missing, is_valid_utf8, printable, show, type_name

_MAX_ROWS_LISTED = 10  # rows named in one "duplicate id" reason

logger = logging.getLogger(__name__)


class Suite:
    """For a checked column `c` the prepared frame holds `c` itself (text made UTF-8-clean, other
    values as a short repr, missing as None: GX hashes the frame, so it must be hashable and
    encodable) and derived columns for what GX has no expectation for:
    `c__is_text` (True/False, None when missing), `c__utf8`, `c__text` (the text, None otherwise)
    and `c__stripped`. Derived booleans are None where they do not apply, and GX's column-map
    expectations skip None, so one bad value is reported once, by the check that explains it.
    """

    def __init__(self, df: pd.DataFrame):
        self.df = df.reset_index(drop=True)
        self.n = len(self.df)
        self.rows = source_rows(self.df)
        self.series: dict[str, pd.Series] = {}
        self.checks: list[Check] = []
        self.present: set[str] = set()
        self.raw: dict[str, list] = {}

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.series, index=pd.RangeIndex(self.n))

    def _set(self, name: str, values: list, dtype=object) -> None:
        self.series[name] = pd.Series(values, index=pd.RangeIndex(self.n), dtype=dtype)

    def _add(self, key: str, expectation, column: str | None, row_reason=None, dataset_reasons=None,
             fatal: bool = False) -> None:
        self.checks.append(Check(f"{key}:{column}" if column else key, expectation, column,
                                 row_reason, dataset_reasons, fatal))

    def _expect_true(self, key: str, derived: str, values: list, column: str | None,
                     row_reason: Callable[[int], str]) -> None:
        """A derived column of True/False/None and the expectation that it holds only True
        (None: does not apply here, left to the check that explains it)."""
        self._set(derived, values)
        self._add(key, gx().expectations.ExpectColumnValuesToBeInSet(column=derived, value_set=[True]), column,
                  row_reason=row_reason)

    # -- table ---------------------------------------------------------------------------------

    def has_rows(self) -> None:
        self._add("row_count", gx().expectations.ExpectTableRowCountToBeBetween(min_value=1), None,
                  dataset_reasons=lambda info: [(None, "no rows")])

    def row_count(self, expected: int) -> None:
        self._add("row_count_exact", gx().expectations.ExpectTableRowCountToEqual(value=expected), None,
                  dataset_reasons=lambda info: [(None, f"{self.n} rows, expected {expected}")])

    def first_occurrences(self, columns: tuple[str, ...], what: str) -> None:
        """No row repeats an earlier row's values of `columns` verbatim; each repeat after the
        first is flagged, naming the first. Rows with a value that is not text there are left to
        the checks that explain them."""
        first_of: dict[tuple, int] = {}
        first: list[int | None] = []
        for p, key in enumerate(zip(*(self.raw[c] for c in columns))):
            first.append(first_of.setdefault(key, int(self.rows[p]))
                         if all(isinstance(v, str) for v in key) else None)
        named = ", ".join(columns[:-1]) + f" and {columns[-1]}" if len(columns) > 1 else columns[0]
        self._expect_true("first_occurrence", f"{what}__first_occurrence",
                          [None if f is None else f == int(r) for f, r in zip(first, self.rows)], None,
                          lambda p: f"duplicate {what}: repeats row {first[p]} verbatim (same {named})")

    # -- columns -------------------------------------------------------------------------------

    def column(self, column: str, required: bool = True) -> bool:
        """Load a column into the prepared frame; expect it to exist (if required) and have no
        missing values. Returns whether the column is there."""
        E = gx().expectations
        present = column in self.df.columns
        if not present and not required:
            return False
        self._add("exists", E.ExpectColumnToExist(column=column), column,
                  dataset_reasons=lambda info, c=column: [(c, "missing required column")], fatal=True)
        if not present:
            return False
        raw = self.df[column].tolist()
        self.raw[column] = raw
        self.present.add(column)
        self._set(column, [None if is_missing(v) else (clean(v) if isinstance(v, str) else show(v, 80))
                           for v in raw])
        self._add("not_null", E.ExpectColumnValuesToNotBeNull(column=column), column,
                  row_reason=lambda p, c=column: "missing value (null/NaN)"
                  if not isinstance(self.raw[c][p], str) and self.raw[c][p] is not None else "missing value")
        return True

    def is_text(self, column: str) -> list[bool | None]:
        """Values are strings (`c__is_text`); `c__text` holds the UTF-8-clean text."""
        raw = self.raw[column]
        is_text = [None if is_missing(v) else isinstance(v, str) for v in raw]
        self._expect_true("is_text", f"{column}__is_text", is_text, column,
                          lambda p: f"wrong type: expected text, got {type_name(raw[p])} {show(raw[p])}")
        self._set(f"{column}__text", [clean(v) if t else None for v, t in zip(raw, is_text)])
        return is_text

    def is_id(self, column: str) -> list[bool | None]:
        """Values are ids: non-blank text or integers (`c__is_id`)."""
        raw = self.raw[column]
        valid = [_id_ok(v) for v in raw]
        self._expect_true("is_id", f"{column}__is_id", valid, column,
                          lambda p: "empty id" if isinstance(raw[p], str)
                          else f"wrong type: expected a text or integer id, got {type_name(raw[p])} {show(raw[p])}")
        return valid

    def text(self, column: str, max_chars: int | None = None, min_chars: int | None = None) -> None:
        """Values are strings, valid UTF-8, with at least min_chars non-blank characters after
        stripping whitespace, and at most max_chars characters."""
        E = gx().expectations
        raw = self.raw[column]
        is_text = self.is_text(column)
        self._expect_true("utf8", f"{column}__utf8", [is_valid_utf8(v) if t else None for v, t in zip(raw, is_text)],
                          column, lambda p: f"invalid UTF-8: text holds bytes that are not UTF-8 ({show(raw[p])})")
        text = self.series[f"{column}__text"].tolist()
        self._set(f"{column}__stripped", [v.strip() if v is not None else None for v in text])
        if min_chars is not None and min_chars > 0:
            def short(p, minimum=min_chars):
                n = len(text[p].strip())
                if n == 0:
                    return "empty text" + (" (whitespace only)" if text[p] else "")
                return f"too short: {n} characters after stripping whitespace (min {minimum})"

            self._add("min_length", E.ExpectColumnValueLengthsToBeBetween(
                column=f"{column}__stripped", min_value=min_chars), column, row_reason=short)
        if max_chars is not None:
            self._add("max_length", E.ExpectColumnValueLengthsToBeBetween(
                column=f"{column}__text", max_value=max_chars), column,
                row_reason=lambda p, m=max_chars: f"too long: {len(text[p])} characters (max {m})")

    def identifier(self, column: str, derived_from: str | None = None) -> None:
        """Ids are valid (is_id) and unique; every duplicated row is flagged. With derived_from,
        the ids were made from that text column, so a duplicate is reported there, as duplicate text."""
        valid = self.is_id(column)
        keys = [clean(str(v)) if good else None for v, good in zip(self.raw[column], valid)]
        self._set(f"{column}__key", keys)
        rows_of: dict[str, list[int]] = {}
        for p, k in enumerate(keys):
            if k is not None:
                rows_of.setdefault(k, []).append(int(self.rows[p]))

        def duplicate(p):
            rows = rows_of[keys[p]]
            listed = ", ".join(map(str, rows[:_MAX_ROWS_LISTED])) + (", ..." if len(rows) > _MAX_ROWS_LISTED else "")
            what = f"{derived_from} text" if derived_from else f"{column} {show(keys[p])}"
            return f"duplicate {what} (rows {listed})"

        self._add("unique", gx().expectations.ExpectColumnValuesToBeUnique(column=f"{column}__key"),
                  derived_from or column, row_reason=duplicate)

    def in_set(self, column: str, allowed: tuple[str, ...], what: str) -> None:
        raw = self.raw[column]
        self.is_text(column)
        known = ", ".join(repr(a) for a in allowed) or "(none)"
        self._add("in_set", gx().expectations.ExpectColumnValuesToBeInSet(
            column=f"{column}__text", value_set=list(allowed)),
            column, row_reason=lambda p: f"unknown {what} {show(raw[p])} (expected one of {known})")

    def differ(self, a: str, b: str) -> None:
        """Values of a and b differ in every row (compared after stripping whitespace)."""
        self._add("differ", gx().expectations.ExpectSelectColumnValuesToBeUniqueWithinRecord(
            column_list=[f"{a}__stripped", f"{b}__stripped"]), a, row_reason=lambda p: f"{a} equals {b}")

    def shares(self, column: str, allowed: tuple[str, ...], min_share: float) -> dict[str, int]:
        """Each value of `column` present holds at least min_share of the rows with a known value
        (a dataset-level check). Returns the counts of every value."""
        values = self.series[f"{column}__text"].tolist()
        counts: dict[str, int] = {}
        for v in values:
            if v is not None:
                counts[v] = counts.get(v, 0) + 1
        total = sum(n for v, n in counts.items() if v in allowed)
        share = [counts[v] / total if v is not None and v in allowed else np.nan for v in values]
        self._set(f"{column}__share", share, dtype="float64")
        if total and min_share > 0:
            def below(info):
                return [(column, f"{column} {a!r} holds {counts[a]} of {total} rows "
                                 f"({counts[a] / total:.1%}), below the minimum share {min_share:g}")
                        for a in sorted(counts) if a in allowed and counts[a] / total < min_share]

            self._add("share", gx().expectations.ExpectColumnMinToBeBetween(
                column=f"{column}__share", min_value=min_share), column, dataset_reasons=below)
        return counts

    def finite(self, column: str) -> None:
        """Values are finite numbers (not NaN, not infinite, not text)."""
        raw = self.raw[column]
        ok = [isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
              and math.isfinite(float(v)) for v in raw]
        self._expect_true("finite", f"{column}__finite", ok, column,
                          lambda p: f"not a finite number: {show(raw[p])}")

    # -- run -----------------------------------------------------------------------------------

    def run(self, source: str, kind: str) -> ValidationReport:
        rows = tuple(int(r) for r in self.rows)
        try:
            result = run_suite(self.frame(), self.checks, f"vas_{kind}")
        except Exception as exc:  # never raise on bad data: a failure to validate is a problem
            logger.exception("GX validation of %s failed", source)
            problem = Problem(source, None, None, f"validation could not run: {printable(str(exc))}", fatal=True)
            return ValidationReport(source, kind, self.n, [problem], [], {"error": printable(str(exc))}, rows=rows)
        problems, failed, stats = collect(result, self.checks, source, self.rows)
        return ValidationReport(source, kind, self.n, problems, failed, stats, rows=rows)


def _id_ok(value) -> bool | None:
    """An id is non-blank text or an integer; None when missing (reported as missing)."""
    if is_missing(value):
        return None
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
