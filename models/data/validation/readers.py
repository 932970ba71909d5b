"""Reading CSV, JSONL and Parquet files into frames of raw values, each row tagged with its
1-based place in the file (`_row`). Files are only read, never written."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from models.data.validation.report import Problem
from models.data.validation.text import printable, type_name

CSV_SUFFIXES = {".csv"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}

ROW = "_row"


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


def detect_kind(df: pd.DataFrame) -> str:
    return "pairs" if {"chosen", "rejected"} & set(df.columns) else "prompts"


def source_rows(df: pd.DataFrame) -> np.ndarray:
    """1-based source row of each position: `_row` if present, else index + 1."""
    if ROW in df.columns:
        return df[ROW].to_numpy(dtype="int64")
    if pd.api.types.is_integer_dtype(df.index):
        return df.index.to_numpy(dtype="int64") + 1
    return np.arange(1, len(df) + 1, dtype="int64")


def _unique_header(names: list[str], file: str, problems: list[Problem]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for raw in names:
        col = raw.strip()
        if col in seen:
            seen[col] += 1
            new = f"{col}.{seen[col]}"
            problems.append(Problem(file, None, printable(col),
                                    f"duplicate column name in header; the later one is read as {printable(new)!r}"))
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
                                                      "it and the rest of the file were not read", fatal=True))
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
                                        f"line is a JSON {type_name(obj)}, not an object"))
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
            Problem(name, None, None, f"unreadable Parquet file: {printable(str(exc))}", fatal=True)]
    df = df.reset_index(drop=True)
    df[ROW] = np.arange(1, len(df) + 1, dtype="int64")
    return df, []
