"""The Great Expectations adapter: one ephemeral GX context per process, a suite run on a
prepared frame, and each failed expectation read back as problems on the source file's rows.

great_expectations is imported lazily (it is slow to import and phones home unless told not to).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from models.data.validation.report import Problem, jsonable
from models.data.validation.text import printable

_MAX_ROWS_IN_EXPECTATION = 100  # rows listed per failed expectation in the report
_GX_LOCK = threading.Lock()


def gx():
    import great_expectations

    return great_expectations


@functools.lru_cache(maxsize=1)
def _gx_batch_definition():
    """One ephemeral GX context per process, with one pandas whole-dataframe batch definition."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    from great_expectations.data_context.types.base import ProgressBarsConfig

    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)
    context = gx().get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("vas_validation")
    asset = source.add_dataframe_asset("frame")
    return asset.add_batch_definition_whole_dataframe("whole_frame")


@dataclass
class Check:
    """One expectation of the suite and how its failures read as problems."""

    key: str
    expectation: Any
    column: str | None  # the user-facing column a failure names
    row_reason: Callable[[int], str] | None = None  # position -> reason, for row-level checks
    dataset_reasons: Callable[[dict], list[tuple[str | None, str]]] | None = None  # result -> problems
    fatal: bool = False  # its dataset-level failure leaves no row usable (a missing required column)


def run_suite(prepared: pd.DataFrame, checks: list[Check], name: str):
    """Validate `prepared` against a suite of the checks' expectations; GX's result."""
    with _GX_LOCK:
        # The context must exist before a suite is built: ExpectationSuite.add_expectation looks
        # up the current project's store to decide whether to save.
        batch_definition = _gx_batch_definition()
        suite = gx().ExpectationSuite(name=name)
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


def _raised(res) -> Any:
    exception = (res.exception_info or {}) if isinstance(res.exception_info, dict) else {}
    raised = exception.get("raised_exception")
    if raised is None:  # GX nests exception info per metric in some versions
        nested = [v for v in exception.values() if isinstance(v, dict) and v.get("raised_exception")]
        raised = nested[0] if nested else None
    return raised


def collect(result, checks: list[Check], source: str, rows: np.ndarray,
            ) -> tuple[list[Problem], list[dict], dict]:
    """(problems, failed expectations, GX statistics) of a suite result; `rows` maps positions
    of the prepared frame to source rows."""
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
        raised = _raised(res)
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
            entry["exception"] = printable(str(message))
            problems.append(Problem(source, None, check.column,
                                    f"check {config.type} could not run: {entry['exception']}", fatal=True))
        elif positions and check.row_reason is not None:
            for p in positions:
                problems.append(Problem(source, int(rows[p]), check.column, check.row_reason(p)))
        elif check.dataset_reasons is not None:
            for column, reason in check.dataset_reasons(info):
                problems.append(Problem(source, None, column, reason, fatal=check.fatal))
        else:
            problems.append(Problem(source, None, check.column, f"{config.type} failed"))
        failed.append(entry)
    stats = {k: jsonable(v) for k, v in (result.statistics or {}).items()}
    return problems, failed, stats
