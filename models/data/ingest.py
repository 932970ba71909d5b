"""New preference data: files dropped into data/incoming/, validated, then merged into one table.

The merged table keeps every accepted row with the md5 and name of the file it came from, so a
file is merged once however often it is offered, and each pair's origin stays auditable. Files
in data/incoming/ are only read: they stay there as the raw record of what was delivered.
Nothing here imports dagster.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from models.artifacts import file_md5
from models.data.validation import (
    CSV_SUFFIXES,
    JSONL_SUFFIXES,
    PAIR_OUTPUT_COLUMNS,
    PARQUET_SUFFIXES,
    Problem,
    ValidationReport,
    ValidationRules,
    import_preference_file,
)

SUPPORTED_SUFFIXES = CSV_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
IMPORTED_COLUMNS = (*PAIR_OUTPUT_COLUMNS, "source_md5", "source_file", "source_row")
# Names that mean "still being written": editors' and copy tools' partial files.
PARTIAL_SUFFIXES = {".tmp", ".part", ".partial", ".crdownload", ".swp"}


def incoming_files(folder: Path, settle_seconds: float = 0.0, now: float | None = None) -> list[Path]:
    """Files in folder that look complete: a supported suffix, not hidden, not a partial
    download, and unmodified for settle_seconds (a file still being copied is left for later)."""
    if not folder.is_dir():
        return []
    now = time.time() if now is None else now
    found = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith((".", "~")):
            continue
        if path.suffix.lower() in PARTIAL_SUFFIXES or path.suffix.lower() not in SUPPORTED_SUFFIXES:
            continue
        if now - path.stat().st_mtime < settle_seconds:
            continue
        found.append(path)
    return found


def empty_imported() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype="int64" if c == "source_row" else "str") for c in IMPORTED_COLUMNS})


def read_incoming(path: Path, rules: ValidationRules, quarantine_dir: Path
                  ) -> tuple[pd.DataFrame, ValidationReport, Path | None]:
    """Validate one incoming preference file; its good rows tagged with their origin.

    A file is accepted only whole: any bad row, a missing column or no rows at all fails it
    (report.success False, bad rows quarantined), so a half-broken delivery never trains a model.
    A file that cannot be read at all (gone, unsupported type) fails the same way, never raises.
    """
    try:
        df, report, quarantined = import_preference_file(path, rules, quarantine_dir)
    except (OSError, ValueError) as exc:
        return empty_imported(), ValidationReport(str(path), "pairs", 0, [
            Problem(str(path), None, None, f"unreadable: {exc}", fatal=True)]), None
    md5 = file_md5(path)
    if report.success and len(df) == 0:
        report.problems.append(Problem(str(path), None, None, "no preference pairs in the file"))
    rows = df.reset_index(drop=True)
    # Pair ids are unique per file only; the file's md5 makes them unique in the merged table.
    rows["pair_id"] = [f"{md5[:8]}-{pid}" for pid in rows["pair_id"]]
    rows["source_md5"] = md5
    rows["source_file"] = path.name
    rows["source_row"] = range(1, len(rows) + 1)
    return rows[list(IMPORTED_COLUMNS)], report, quarantined

