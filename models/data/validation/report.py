"""What validation finds: problems (file, row, column, reason) and the report that holds them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from models.data.validation.text import printable


@dataclass
class Problem:
    file: str
    row: int | None  # 1-based data record in the file; None for file- or dataset-level problems
    column: str | None
    reason: str
    # A file-level problem after which no row can be trusted (missing required column, unreadable
    # file, a check that could not run): every row is then bad. Set where the problem is raised.
    fatal: bool = False

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {printable(str(self.column))!r}")
        head = f"{self.file}: " + (", ".join(where) + ": " if where else "")
        return head + self.reason


@dataclass
class ValidationReport:
    source: str
    kind: str  # "prompts" | "pairs" | "rollouts"
    n_rows: int
    problems: list[Problem] = field(default_factory=list)
    failed_expectations: list[dict] = field(default_factory=list)
    statistics: dict = field(default_factory=dict)
    # Every source row number of the data validated (set by validation), so that a fatal problem
    # (a missing required column) can mark all rows bad.
    rows: tuple[int, ...] = field(default=(), repr=False, compare=False)

    @property
    def success(self) -> bool:
        return not self.problems

    @property
    def fatal(self) -> bool:
        """True when a problem makes every row unusable."""
        return any(p.fatal for p in self.problems)

    @property
    def bad_rows(self) -> set[int]:
        rows = {p.row for p in self.problems if p.row is not None}
        if self.fatal:
            rows |= set(self.rows)
        return rows

    def finish(self) -> None:
        """Problems in row order (file-level first, stable within a row) and the counts."""
        self.problems.sort(key=lambda p: (p.row is not None, p.row or 0))
        self.statistics.update({
            "n_rows": self.n_rows,
            "n_bad_rows": len(self.bad_rows),
            "n_problems": len(self.problems),
        })

    def to_dict(self) -> dict:
        return jsonable({
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


def jsonable(obj):
    """obj with numpy scalars as Python ones, non-finite floats as None and text printable."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None:
        return None
    return printable(obj if isinstance(obj, str) else str(obj))
