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
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import math
import os
import sys
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from models.artifacts import file_md5, write_csv
from models.rewards import GOLD_REWARDS

PROMPT_COLUMNS = ("prompt_id", "split", "prompt")
PAIR_REQUIRED = ("prompt", "chosen", "rejected")
PAIR_OUTPUT_COLUMNS = ("pair_id", "attribute", "prompt_id", "prompt", "chosen", "rejected")
SPLITS = ("train", "eval")
REQUIRED_COLUMNS = {"prompts": PROMPT_COLUMNS, "pairs": PAIR_REQUIRED}

CSV_SUFFIXES = {".csv"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}

ROW = "_row"
# File-level problems after which no row can be trusted: all rows are bad and quarantined.
_FATAL_MARKERS = ("missing required column", "unreadable", "could not run")
_MAX_ROWS_LISTED = 10  # rows named in one "duplicate id" reason
_MAX_ROWS_IN_EXPECTATION = 100  # rows listed per failed expectation in the report

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Rules, problems, report


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


@dataclass
class Problem:
    file: str
    row: int | None  # 1-based data record in the file; None for file- or dataset-level problems
    column: str | None
    reason: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {_printable(str(self.column))!r}")
        head = f"{self.file}: " + (", ".join(where) + ": " if where else "")
        return head + self.reason


@dataclass
class ValidationReport:
    source: str
    kind: str  # "prompts" | "pairs"
    n_rows: int
    problems: list[Problem] = field(default_factory=list)
    failed_expectations: list[dict] = field(default_factory=list)
    statistics: dict = field(default_factory=dict)
    # Every source row number of the data validated (set by validation), so that a file-level
    # problem no row survives (a missing required column) can mark all rows bad.
    rows: tuple[int, ...] = field(default=(), repr=False, compare=False)

    @property
    def success(self) -> bool:
        return not self.problems

    @property
    def fatal(self) -> bool:
        """True when a file-level problem makes every row unusable (missing required column,
        unreadable file, a check that could not run)."""
        return any(p.row is None and any(m in p.reason for m in _FATAL_MARKERS) for p in self.problems)

    @property
    def bad_rows(self) -> set[int]:
        rows = {p.row for p in self.problems if p.row is not None}
        if self.fatal:
            rows |= set(self.rows)
        return rows

    def to_dict(self) -> dict:
        return _jsonable({
            "source": self.source,
            "kind": self.kind,
            "success": self.success,
            "n_rows": self.n_rows,
            "n_problems": len(self.problems),
            "bad_rows": sorted(self.bad_rows),
            "problems": [vars(p) for p in self.problems],
            "failed_expectations": self.failed_expectations,
            "statistics": self.statistics,
        })

    def summary(self) -> str:
        if self.success:
            return f"{self.source}: OK, {self.n_rows} rows"
        n = len(self.problems)
        return (f"{self.source}: {len(self.bad_rows)} of {self.n_rows} rows failed validation "
                f"({n} problem{'s' if n != 1 else ''})")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return _printable(obj) if isinstance(obj, str) else None
    return _printable(str(obj))


# --------------------------------------------------------------------------------------------
# Text helpers


def _is_missing(value) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return False


def _is_valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(text: str) -> str:
    """Text safe to print and to encode as UTF-8: undecodable bytes read with surrogateescape
    show as \\xNN, other lone surrogates as \\udNNN."""
    if _is_valid_utf8(text):
        return text
    return text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "backslashreplace") \
        .decode("utf-8", "backslashreplace")


def _only_escapes(text: str) -> bool:
    # surrogateescape can encode only U+DC80..U+DCFF (the bytes 0x80..0xFF it decoded).
    return all(not (0xD800 <= ord(c) <= 0xDFFF) or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _clean(text: str) -> str:
    """UTF-8-clean text of the same length for GX: each lone surrogate becomes U+FFFD."""
    if _is_valid_utf8(text):
        return text
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def _show(value, limit: int = 40) -> str:
    if isinstance(value, str):
        text = _printable(value)
        text = text if len(text) <= limit else text[:limit] + "..."
        # Quoted, not repr(): repr would double the backslash of a \xNN byte escape.
        return f"'{text}'"
    return _printable(repr(value))[:limit]


def _type_name(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "boolean"
    if isinstance(value, (int, np.integer)):
        return "integer"
    if isinstance(value, (float, np.floating)):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "array"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    return type(value).__name__


def _text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "surrogatepass")).hexdigest()


def prompt_id_for(text: str) -> str:
    """Deterministic prompt id from the prompt text (the same text gets the same id in every file)."""
    return f"p-{_text_hash(text)[:12]}"


# --------------------------------------------------------------------------------------------
# Reading files


def read_table(path) -> tuple[pd.DataFrame, list[Problem]]:
    """Read a CSV, JSONL or Parquet file into a frame of its raw values plus a 1-based `_row`.

    Values are kept as read (object dtype for CSV and JSONL) so that validation can tell missing
    values, wrong types, empty and undecodable text apart. A CSV cell that is empty reads as ""
    (empty text); a field a short record lacks, or a JSON null, reads as None (missing). Bytes
    that are not UTF-8 are kept as surrogate escapes and reported on their row. Records that
    cannot be parsed are kept (with missing values) and come back as row problems. The file is
    only read, never written.
    """
    path = Path(path)
    name = str(path)
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        reader = _read_csv
    elif suffix in JSONL_SUFFIXES:
        reader = _read_jsonl
    elif suffix in PARQUET_SUFFIXES:
        reader = _read_parquet
    else:
        known = ", ".join(sorted(CSV_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES))
        raise ValueError(f"{name}: unsupported file type {path.suffix or '(none)'!r}; expected one of {known}")
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file")
    return reader(path, name)


def _unique_header(names: list[str], file: str, problems: list[Problem]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for raw in names:
        col = raw.strip()
        if col in seen:
            seen[col] += 1
            new = f"{col}.{seen[col]}"
            problems.append(Problem(file, None, _printable(col),
                                    f"duplicate column name in header; the later one is read as {_printable(new)!r}"))
            col = new
        else:
            seen[col] = 0
        out.append(col)
    return out


def _read_csv(path: Path, name: str) -> tuple[pd.DataFrame, list[Problem]]:
    problems: list[Problem] = []
    header: list[str] | None = None
    records: list[list[str]] = []
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        try:
            for record in reader:
                if header is None:
                    if record:
                        header = _unique_header(record, name, problems)
                    continue
                records.append(record)
        except csv.Error as exc:
            problems.append(Problem(name, None, None, f"unreadable CSV record {len(records) + 1} ({exc}); "
                                                      "it and the rest of the file were not read"))
    if header is None:
        return pd.DataFrame({ROW: pd.Series([], dtype="int64")}), problems
    while records and not records[-1]:  # trailing blank lines are not records
        records.pop()
    width = len(header)
    rows = []
    for i, record in enumerate(records, start=1):
        if not record:
            if width == 1:
                rows.append([""])
                continue
            problems.append(Problem(name, i, None, f"empty line; expected {width} fields"))
            rows.append([None] * width)
            continue
        if len(record) != width:
            problems.append(Problem(name, i, None, f"expected {width} fields, found {len(record)}"))
            record = (record + [None] * width)[:width]
        rows.append(record)
    df = pd.DataFrame(rows, columns=header, dtype=object) if rows else \
        pd.DataFrame({c: pd.Series([], dtype=object) for c in header})
    df[ROW] = np.arange(1, len(df) + 1, dtype="int64")
    return df, problems


def _read_jsonl(path: Path, name: str) -> tuple[pd.DataFrame, list[Problem]]:
    problems: list[Problem] = []
    objects: list[dict] = []
    line_numbers: list[int] = []
    columns: dict[str, None] = {}
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        text = raw.decode("utf-8", "surrogateescape")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(Problem(name, number, None, f"invalid JSON: {exc.msg} at column {exc.colno}"))
            obj = {}
        else:
            if not isinstance(obj, dict):
                problems.append(Problem(name, number, None,
                                        f"line is a JSON {_type_name(obj)}, not an object"))
                obj = {}
        for key in obj:
            columns.setdefault(key, None)
        objects.append(obj)
        line_numbers.append(number)
    cols = list(columns)
    df = pd.DataFrame([[obj.get(c) for c in cols] for obj in objects], columns=cols, dtype=object) \
        if objects else pd.DataFrame({c: pd.Series([], dtype=object) for c in cols})
    df[ROW] = np.asarray(line_numbers, dtype="int64")
    return df, problems


def _read_parquet(path: Path, name: str) -> tuple[pd.DataFrame, list[Problem]]:
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # corrupt or not a parquet file: a file-level problem, not a crash
        return pd.DataFrame({ROW: pd.Series([], dtype="int64")}), [
            Problem(name, None, None, f"unreadable Parquet file: {_printable(str(exc))}")]
    df = df.reset_index(drop=True)
    df[ROW] = np.arange(1, len(df) + 1, dtype="int64")
    return df, []


def detect_kind(df: pd.DataFrame) -> str:
    return "pairs" if {"chosen", "rejected"} & set(df.columns) else "prompts"


# --------------------------------------------------------------------------------------------
# Great Expectations


_GX_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _gx_batch_definition():
    """One ephemeral GX context per process, with one pandas whole-dataframe batch definition."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("vas_validation")
    asset = source.add_dataframe_asset("frame")
    return asset.add_batch_definition_whole_dataframe("whole_frame")


@dataclass
class _Check:
    """One expectation of the suite and how its failures read as problems."""

    key: str
    expectation: Any
    column: str | None  # the user-facing column a failure names
    row_reason: Callable[[int], str] | None = None  # position -> reason, for row-level checks
    dataset_reasons: Callable[[dict], list[tuple[str | None, str]]] | None = None  # result -> problems


def _run_suite(prepared: pd.DataFrame, checks: list[_Check], name: str):
    import great_expectations as gx

    with _GX_LOCK:
        # The context must exist before a suite is built: ExpectationSuite.add_expectation looks
        # up the current project's store to decide whether to save.
        batch_definition = _gx_batch_definition()
        suite = gx.ExpectationSuite(name=name)
        for check in checks:
            check.expectation.meta = {"vas_check": check.key}
            suite.add_expectation(check.expectation)
        batch = batch_definition.get_batch(batch_parameters={"dataframe": prepared})
        return batch.validate(suite, result_format={"result_format": "COMPLETE"})


def _expectation_column(config) -> str | None:
    kwargs = config.kwargs or {}
    if "column" in kwargs:
        return kwargs["column"]
    if "column_list" in kwargs:
        return ",".join(kwargs["column_list"])
    return None


def _collect(result, checks: list[_Check], source: str, rows: np.ndarray,
             ) -> tuple[list[Problem], list[dict], dict]:
    order = {c.key: i for i, c in enumerate(checks)}
    problems: list[Problem] = []
    failed: list[dict] = []
    # GX does not keep the suite's order; report in check order (stable per row later).
    results = sorted(result.results, key=lambda r: order[(r.expectation_config.meta or {}).get("vas_check")])
    for res in results:
        if res.success:
            continue
        config = res.expectation_config
        check = checks[order[(config.meta or {}).get("vas_check")]]
        info = res.result or {}
        exception = (res.exception_info or {}) if isinstance(res.exception_info, dict) else {}
        raised = exception.get("raised_exception")
        if raised is None:  # GX nests exception info per metric in some versions
            nested = [v for v in exception.values() if isinstance(v, dict) and v.get("raised_exception")]
            raised = nested[0] if nested else None
        positions = [int(i) for i in info.get("unexpected_index_list") or []]
        entry = {
            "expectation": config.type,
            "check": check.key,
            "column": check.column,
            "gx_column": _expectation_column(config),
            "unexpected_count": int(info.get("unexpected_count", len(positions)) or 0),
        }
        if "observed_value" in info:
            entry["observed_value"] = info["observed_value"]
        if positions:
            listed = sorted({int(rows[p]) for p in positions})
            entry["rows"] = listed[:_MAX_ROWS_IN_EXPECTATION]
            if len(listed) > _MAX_ROWS_IN_EXPECTATION:
                entry["rows_truncated"] = True
        if raised:
            message = raised.get("exception_message") if isinstance(raised, dict) else str(raised)
            entry["exception"] = _printable(str(message))
            problems.append(Problem(source, None, check.column,
                                    f"check {config.type} could not run: {entry['exception']}"))
        elif positions and check.row_reason is not None:
            for p in positions:
                problems.append(Problem(source, int(rows[p]), check.column, check.row_reason(p)))
        elif check.dataset_reasons is not None:
            for column, reason in check.dataset_reasons(info):
                problems.append(Problem(source, None, column, reason))
        else:
            problems.append(Problem(source, None, check.column, f"{config.type} failed"))
        failed.append(entry)
    stats = {k: _jsonable(v) for k, v in (result.statistics or {}).items()}
    return problems, failed, stats


def _source_rows(df: pd.DataFrame) -> np.ndarray:
    """1-based source row of each position: `_row` if present, else index + 1."""
    if ROW in df.columns:
        return df[ROW].to_numpy(dtype="int64")
    if pd.api.types.is_integer_dtype(df.index):
        return df.index.to_numpy(dtype="int64") + 1
    return np.arange(1, len(df) + 1, dtype="int64")


class _Suite:
    """Builds the prepared frame GX validates and the checks (expectations) that run on it.

    For a checked column `c` the prepared frame holds `c` itself (text made UTF-8-clean, other
    values as a short repr, missing as None: GX hashes the frame, so it must be hashable and
    encodable) and derived columns for what GX has no expectation for:
    `c__is_text` (True/False, None when missing), `c__utf8`, `c__text` (the text, None otherwise)
    and `c__stripped`. Derived booleans are None where they do not apply, and GX's column-map
    expectations skip None, so one bad value is reported once, by the check that explains it.
    """

    def __init__(self, df: pd.DataFrame, rules: ValidationRules):
        self.df = df.reset_index(drop=True)
        self.rules = rules
        self.n = len(self.df)
        self.series: dict[str, pd.Series] = {}
        self.checks: list[_Check] = []
        self.present: set[str] = set()
        self.raw: dict[str, list] = {}

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.series, index=pd.RangeIndex(self.n))

    def _set(self, name: str, values: list, dtype=object) -> None:
        self.series[name] = pd.Series(values, index=pd.RangeIndex(self.n), dtype=dtype)

    def _add(self, key: str, expectation, column: str | None, row_reason=None, dataset_reasons=None) -> None:
        self.checks.append(_Check(f"{key}:{column}" if column else key, expectation, column,
                                  row_reason, dataset_reasons))

    # -- table ---------------------------------------------------------------------------------

    def has_rows(self) -> None:
        gx = _gx()
        self._add("row_count", gx.expectations.ExpectTableRowCountToBeBetween(min_value=1), None,
                  dataset_reasons=lambda info: [(None, "no rows")])

    # -- columns -------------------------------------------------------------------------------

    def column(self, column: str, required: bool = True) -> bool:
        """Load a column into the prepared frame; expect it to exist (if required) and have no
        missing values. Returns whether the column is there."""
        gx = _gx()
        present = column in self.df.columns
        if not present and not required:
            return False
        self._add("exists", gx.expectations.ExpectColumnToExist(column=column), column,
                  dataset_reasons=lambda info, c=column: [(c, "missing required column")])
        if not present:
            return False
        raw = self.df[column].tolist()
        self.raw[column] = raw
        self.present.add(column)
        self._set(column, [None if _is_missing(v) else (_clean(v) if isinstance(v, str) else _show(v, 80))
                           for v in raw])
        self._add("not_null", gx.expectations.ExpectColumnValuesToNotBeNull(column=column), column,
                  row_reason=lambda p, c=column: "missing value (null/NaN)"
                  if not isinstance(self.raw[c][p], str) and self.raw[c][p] is not None else "missing value")
        return True

    def text(self, column: str, max_chars: int | None = None, min_chars: int | None = None) -> None:
        """Values are strings, valid UTF-8, with at least min_chars non-blank characters after
        stripping whitespace, and at most max_chars characters."""
        gx = _gx()
        E = gx.expectations
        raw = self.raw[column]
        is_text = [None if _is_missing(v) else isinstance(v, str) for v in raw]
        self._set(f"{column}__is_text", is_text)
        self._add("is_text", E.ExpectColumnValuesToBeInSet(column=f"{column}__is_text", value_set=[True]),
                  column, row_reason=lambda p: f"wrong type: expected text, got {_type_name(raw[p])} {_show(raw[p])}")
        self._set(f"{column}__utf8", [_is_valid_utf8(v) if t else None for v, t in zip(raw, is_text)])
        self._add("utf8", E.ExpectColumnValuesToBeInSet(column=f"{column}__utf8", value_set=[True]), column,
                  row_reason=lambda p: f"invalid UTF-8: text holds bytes that are not UTF-8 ({_show(raw[p])})")
        text = [_clean(v) if t else None for v, t in zip(raw, is_text)]
        self._set(f"{column}__text", text)
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

    def identifier(self, column: str) -> None:
        """Ids are text or integers, not blank, and unique; every duplicated row is flagged."""
        gx = _gx()
        E = gx.expectations
        raw = self.raw[column]
        valid = [_id_ok(v) for v in raw]
        self._set(f"{column}__is_id", valid)
        self._add("is_id", E.ExpectColumnValuesToBeInSet(column=f"{column}__is_id", value_set=[True]), column,
                  row_reason=lambda p: "empty id" if isinstance(raw[p], str)
                  else f"wrong type: expected a text or integer id, got {_type_name(raw[p])} {_show(raw[p])}")
        keys = [_clean(str(v)) if good else None for v, good in zip(raw, valid)]
        self._set(f"{column}__key", keys)
        rows_of: dict[str, list[int]] = {}
        source_rows = _source_rows(self.df)
        for p, k in enumerate(keys):
            if k is not None:
                rows_of.setdefault(k, []).append(int(source_rows[p]))

        def duplicate(p):
            rows = rows_of[keys[p]]
            listed = ", ".join(map(str, rows[:_MAX_ROWS_LISTED])) + (", ..." if len(rows) > _MAX_ROWS_LISTED else "")
            return f"duplicate {column} {_show(keys[p])} (rows {listed})"

        self._add("unique", E.ExpectColumnValuesToBeUnique(column=f"{column}__key"), column, row_reason=duplicate)

    def in_set(self, column: str, allowed: tuple[str, ...], what: str) -> None:
        gx = _gx()
        E = gx.expectations
        raw = self.raw[column]
        is_text = [None if _is_missing(v) else isinstance(v, str) for v in raw]
        self._set(f"{column}__is_text", is_text)
        self._add("is_text", E.ExpectColumnValuesToBeInSet(column=f"{column}__is_text", value_set=[True]),
                  column, row_reason=lambda p: f"wrong type: expected text, got {_type_name(raw[p])} {_show(raw[p])}")
        self._set(f"{column}__text", [_clean(v) if t else None for v, t in zip(raw, is_text)])
        known = ", ".join(repr(a) for a in allowed) or "(none)"
        self._add("in_set", E.ExpectColumnValuesToBeInSet(column=f"{column}__text", value_set=list(allowed)),
                  column, row_reason=lambda p: f"unknown {what} {_show(raw[p])} (expected one of {known})")

    def differ(self, a: str, b: str) -> None:
        """Values of a and b differ in every row (compared after stripping whitespace)."""
        gx = _gx()
        self._add("differ", gx.expectations.ExpectSelectColumnValuesToBeUniqueWithinRecord(
            column_list=[f"{a}__stripped", f"{b}__stripped"]), a, row_reason=lambda p: f"{a} equals {b}")

    def shares(self, column: str, allowed: tuple[str, ...], min_share: float) -> dict[str, int]:
        """Each value of `column` present holds at least min_share of the rows with a known value
        (a dataset-level check). Returns the counts of every value."""
        gx = _gx()
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

            self._add("share", gx.expectations.ExpectColumnMinToBeBetween(
                column=f"{column}__share", min_value=min_share), column, dataset_reasons=below)
        return counts

    def finite(self, column: str) -> None:
        """Values are finite numbers (not NaN, not infinite, not text)."""
        gx = _gx()
        raw = self.raw[column]
        ok = [isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
              and math.isfinite(float(v)) for v in raw]
        self._set(f"{column}__finite", ok)
        self._add("finite", gx.expectations.ExpectColumnValuesToBeInSet(column=f"{column}__finite", value_set=[True]),
                  column, row_reason=lambda p: f"not a finite number: {_show(raw[p])}")

    def row_count(self, expected: int) -> None:
        gx = _gx()
        self._add("row_count_exact", gx.expectations.ExpectTableRowCountToEqual(value=expected), None,
                  dataset_reasons=lambda info: [(None, f"{self.n} rows, expected {expected}")])

    # -- run -----------------------------------------------------------------------------------

    def run(self, source: str, kind: str) -> ValidationReport:
        rows = _source_rows(self.df)
        try:
            result = _run_suite(self.frame(), self.checks, f"vas_{kind}")
        except Exception as exc:  # never raise on bad data: a failure to validate is a problem
            logger.exception("GX validation of %s failed", source)
            problem = Problem(source, None, None, f"validation could not run: {_printable(str(exc))}")
            return ValidationReport(source, kind, self.n, [problem], [], {"error": _printable(str(exc))},
                                    rows=tuple(int(r) for r in rows))
        problems, failed, stats = _collect(result, self.checks, source, rows)
        return ValidationReport(source, kind, self.n, problems, failed, stats, rows=tuple(int(r) for r in rows))


def _gx():
    import great_expectations as gx

    return gx


def _id_ok(value) -> bool | None:
    """An id is non-blank text or an integer; None when missing (reported as missing)."""
    if _is_missing(value):
        return None
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def validate_prompts(df: pd.DataFrame, source: str, rules: ValidationRules) -> ValidationReport:
    """Prompts: prompt_id (unique), split in {train, eval}, prompt (non-empty UTF-8 text of at most
    rules.max_prompt_chars characters). Never raises on bad data."""
    suite = _Suite(df, rules)
    suite.has_rows()
    if suite.column("prompt_id"):
        suite.identifier("prompt_id")
    if suite.column("split"):
        suite.in_set("split", SPLITS, "split")
    if suite.column("prompt"):
        suite.text("prompt", max_chars=rules.max_prompt_chars, min_chars=rules.min_text_chars)
    report = suite.run(source, "prompts")
    if "split" in suite.present:
        split = suite.series["split__text"]
        report.statistics["split_counts"] = {s: int((split == s).sum()) for s in SPLITS}
    _finish_statistics(report)
    return report


def validate_pairs(df: pd.DataFrame, source: str, rules: ValidationRules) -> ValidationReport:
    """Preference pairs: prompt, chosen, rejected (non-empty UTF-8 text within the length bounds,
    chosen != rejected); if present, pair_id unique, prompt_id set, attribute known and each
    attribute at least rules.min_attribute_share of the pairs. Never raises on bad data."""
    suite = _Suite(df, rules)
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
        _prompt_id_of_pairs(suite)
    counts = None
    if suite.column("attribute", required=False):
        suite.in_set("attribute", tuple(rules.known_attributes), "attribute")
        counts = suite.shares("attribute", tuple(rules.known_attributes), rules.min_attribute_share)
    report = suite.run(source, "pairs")
    if counts is not None:
        total = sum(n for a, n in counts.items() if a in rules.known_attributes)
        report.statistics["attribute_counts"] = {_printable(a): n for a, n in sorted(counts.items())}
        report.statistics["attribute_shares"] = {a: counts[a] / total for a in sorted(counts)
                                                 if a in rules.known_attributes and total}
    _finish_statistics(report)
    return report


def validate_rollouts(df: pd.DataFrame, source: str, expected_rows: int | None = None) -> ValidationReport:
    """Rollouts: non-empty completions, finite reward scores (every learned_/gold_ column), at least
    one token per sample, and, when given, exactly expected_rows rows. Never raises on bad data."""
    suite = _Suite(df, ValidationRules())
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
    _finish_statistics(report)
    return report


def _prompt_id_of_pairs(suite: _Suite) -> None:
    """prompt_id in pairs repeats (many pairs per prompt): only its type is checked."""
    gx = _gx()
    raw = suite.raw["prompt_id"]
    suite._set("prompt_id__is_id", [_id_ok(v) for v in raw])
    suite._add("is_id", gx.expectations.ExpectColumnValuesToBeInSet(column="prompt_id__is_id", value_set=[True]),
               "prompt_id", row_reason=lambda p: "empty id" if isinstance(raw[p], str)
               else f"wrong type: expected a text or integer id, got {_type_name(raw[p])} {_show(raw[p])}")


def _finish_statistics(report: ValidationReport) -> None:
    report.problems.sort(key=lambda p: (p.row is not None, p.row or 0))
    report.statistics.update({
        "n_rows": report.n_rows,
        "n_bad_rows": len(report.bad_rows),
        "n_problems": len(report.problems),
    })


# --------------------------------------------------------------------------------------------
# Quarantine and import


def _split(df: pd.DataFrame, report: ValidationReport) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(good rows, keeping `_row`; bad rows with source_row and reason)."""
    rows = _source_rows(df)
    reasons: dict[int, list[str]] = {}
    for p in report.problems:
        if p.row is not None:
            reasons.setdefault(int(p.row), []).append(p.reason if p.column is None else f"{p.column}: {p.reason}")
    missing = [c for c in REQUIRED_COLUMNS.get(report.kind, ()) if c not in df.columns]
    if missing or report.fatal:
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


def split_quarantine(df: pd.DataFrame, report: ValidationReport) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Good rows (without `_row`) and bad rows (the original columns plus `source_row` and
    `reason`, all reasons of the row joined by "; "). A file missing a required column has no
    good rows. Dataset-level problems (e.g. attribute share) quarantine no row."""
    good, bad = _split(df, report)
    return good.drop(columns=[ROW], errors="ignore"), bad


def _printable_frame(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = [_printable(v) if isinstance(v, str) else v for v in out[column]]
    out.columns = [_printable(str(c)) for c in out.columns]
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


def _normalize_kind(kind: str | None, df: pd.DataFrame) -> str:
    if kind is None:
        return detect_kind(df)
    aliases = {"prompts": "prompts", "prompt": "prompts", "pairs": "pairs", "preference_pairs": "pairs",
               "preferences": "pairs"}
    if kind not in aliases:
        raise ValueError(f"unknown kind {kind!r}; expected 'prompts' or 'pairs'")
    return aliases[kind]


def _check_file(path, kind: str | None, rules: ValidationRules) -> tuple[pd.DataFrame, ValidationReport, dict]:
    """Read and validate a file the way an import does. Returns the frame as validated (with any
    filled-in columns), the report (reading problems included) and what was filled in."""
    source = str(path)
    df, read_problems = read_table(path)
    kind = _normalize_kind(kind, df)
    filled: dict[str, str] = {}
    data_columns = [c for c in df.columns if c != ROW]
    if not data_columns and any(p.row is None for p in read_problems):
        report = ValidationReport(source, kind, len(df), list(read_problems), [], {},
                                  rows=tuple(int(r) for r in _source_rows(df)))
        _finish_statistics(report)
        return df, report, filled
    if kind == "pairs":
        if "attribute" not in df.columns:
            df["attribute"] = rules.default_attribute
            filled["attribute"] = f"default_attribute {rules.default_attribute!r}"
        report = validate_pairs(df, source, rules)
    else:
        if "prompt_id" not in df.columns and "prompt" in df.columns:
            df["prompt_id"] = [prompt_id_for(v) if isinstance(v, str) else f"row-{r}"
                               for v, r in zip(df["prompt"], _source_rows(df))]
            filled["prompt_id"] = "hash of the prompt text"
        if "split" not in df.columns:
            df["split"] = "train"  # provisional; an import draws the seeded eval split afterwards
            filled["split"] = "seeded eval split"
        report = validate_prompts(df, source, rules)
        if "prompt_id" in filled:
            # The ids come from the text: a duplicate id is a duplicate prompt.
            for p in report.problems:
                if p.column == "prompt_id" and p.reason.startswith("duplicate prompt_id"):
                    p.column = "prompt"
                    p.reason = "duplicate prompt text" + p.reason[p.reason.index(" (rows"):]
    # A row that could not be parsed gets one reason, not one "missing value" per column.
    unreadable = {p.row for p in read_problems if p.row is not None and p.column is None}
    report.problems = list(read_problems) + [p for p in report.problems if p.row not in unreadable]
    report.statistics["filled_columns"] = filled
    _finish_statistics(report)
    return df, report, filled


def _as_text(values) -> list[str]:
    return [v if isinstance(v, str) else str(v) for v in values]


def import_preference_file(path, rules: ValidationRules, quarantine_dir
                           ) -> tuple[pd.DataFrame, ValidationReport, Path | None]:
    """Read, validate and quarantine a preference file (CSV, JSONL or Parquet with prompt, chosen,
    rejected[, attribute, pair_id, prompt_id]).

    Returns the good rows as (pair_id, attribute, prompt_id, prompt, chosen, rejected): a missing
    attribute column is filled with rules.default_attribute, a missing pair_id becomes
    "imp-<source row>", a missing prompt_id the hash of the prompt text. Bad rows go to
    quarantine_dir/<stem>-<md5[:8]>.csv with `source_row` and `reason`; the path is None when no
    row was bad. Dataset-level problems quarantine nothing but keep report.success False.
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
    _finish_statistics(report)
    return out, report, quarantined


# --------------------------------------------------------------------------------------------
# CLI


def cli_validate(path: str, kind: str | None = None, quarantine_dir: str | None = None,
                 rules: ValidationRules | None = None) -> int:
    """`vas validate FILE`: print every problem as "FILE: row N, column 'C': reason", then a
    summary line; with quarantine_dir, also write the bad rows there. Returns 0 when the file
    passes, 1 otherwise. The file is only read."""
    rules = rules or ValidationRules()
    if not Path(path).is_file():
        print(f"{path}: no such file", file=sys.stderr)
        return 1
    try:
        df, report, _ = _check_file(path, kind, rules)
    except (ValueError, OSError) as exc:
        print(_printable(str(exc)), file=sys.stderr)
        return 1
    for problem in report.problems:
        print(problem)
    print(report.summary())
    if quarantine_dir is not None:
        _, bad = _split(df, report)
        written = write_quarantine(bad, path, quarantine_dir)
        if written is not None:
            print(f"{path}: {len(bad)} bad rows written to {written}")
    return 0 if report.success else 1
