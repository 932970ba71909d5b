"""Group `validation`: Great Expectations suites as blocking asset checks.

A check re-runs the suite on what the asset stored, and also fails when the asset had to
quarantine rows of an imported file (beyond validation.max_quarantined_fraction), so a bad
import stops the downstream stages and shows the raw file's row-level reasons in the UI.
"""


import json

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from assets.common import output_path, record_check
from assets.resources import VasSettings
from models.data.validation import Problem, ValidationRules, validate_pairs, validate_prompts

MAX_PROBLEMS_SHOWN = 50
DATA_FILES = {"prompts": "prompts.parquet", "preference_pairs": "pairs.parquet",
              "imported_preferences": "pairs.parquet"}


def problems_table(problems: list[dict]) -> str:
    lines = ["| file | row | column | reason |", "|---|---|---|---|"]
    for p in problems[:MAX_PROBLEMS_SHOWN]:
        lines.append(f"| {p['file']} | {p['row'] if p['row'] is not None else ''} | "
                     f"{p['column'] or ''} | {str(p['reason']).replace('|', '/')} |")
    if len(problems) > MAX_PROBLEMS_SHOWN:
        lines.append(f"| ... | | | {len(problems) - MAX_PROBLEMS_SHOWN} more |")
    return "\n".join(lines)


def run_suite_check(context, settings: VasSettings, duckdb: DuckDBResource, asset: str, kind: str,
                    extra_problems=None, allow_empty: bool = False) -> dg.AssetCheckResult:
    rules_params = settings.params()["validation"]
    rules = ValidationRules.from_params(rules_params)
    data_path = output_path(settings, asset) / DATA_FILES[asset]
    report_path = output_path(settings, asset) / "validation.json"
    df = pd.read_parquet(data_path)
    validate = validate_pairs if kind == "pairs" else validate_prompts
    report = validate(df, str(data_path), rules)
    problems = [vars(p) if isinstance(p, Problem) else p for p in report.problems]
    if allow_empty and len(df) == 0:  # nothing imported yet is not a failure
        problems = [p for p in problems if p["row"] is not None or p["reason"] != "no rows"]
    if extra_problems is not None:
        problems += extra_problems(df, str(data_path), rules_params)

    # What the asset found when it read its source (an imported file's bad rows).
    source_report = json.loads(report_path.read_text())
    n_source_rows = int(source_report.get("n_rows", len(df)))
    n_quarantined = len(source_report.get("bad_rows", []))
    quarantined_fraction = n_quarantined / max(1, n_source_rows)
    quarantine_ok = quarantined_fraction <= rules_params["max_quarantined_fraction"]
    if not quarantine_ok:
        problems = source_report.get("problems", []) + problems

    passed = not problems and quarantine_ok
    counts = {
        "n_rows": len(df),
        "n_problems": len(problems),
        "n_failed_expectations": len(report.failed_expectations),
        "n_source_rows": n_source_rows,
        "n_quarantined": n_quarantined,
    }
    record_check(context, settings, duckdb, f"{asset}_suite", asset, passed, counts)
    metadata = {
        **{k: dg.MetadataValue.int(int(v)) for k, v in counts.items()},
        "quarantined_fraction": dg.MetadataValue.float(quarantined_fraction),
        "failed_expectations": dg.MetadataValue.json(report.failed_expectations),
        "statistics": dg.MetadataValue.json(report.statistics),
        "source": str(source_report.get("source", data_path)),
    }
    if problems:
        metadata["problems"] = dg.MetadataValue.md(problems_table(problems))
    if source_report.get("quarantine_file"):
        metadata["quarantine_file"] = dg.MetadataValue.path(source_report["quarantine_file"])
    return dg.AssetCheckResult(passed=passed, metadata=metadata)


def _prompt_token_bound(df, path: str, params: dict) -> list[dict]:
    limit = params["max_prompt_tokens"]
    return [{"file": path, "row": i + 1, "column": "prompt",
             "reason": f"prompt has {n} tokens, more than max_prompt_tokens={limit}"}
            for i, n in enumerate(df.n_prompt_tokens) if n > limit]


@dg.asset_check(asset="prompts", blocking=True,
                description="GX suite: schema, UTF-8 non-empty text, unique ids, splits, length bounds.")
def prompts_suite(context: dg.AssetCheckExecutionContext, settings: VasSettings,
                  duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return run_suite_check(context, settings, duckdb, "prompts", "prompts", _prompt_token_bound)


@dg.asset_check(asset="preference_pairs", blocking=True,
                description="GX suite: schema, UTF-8 non-empty text, unique ids, chosen != rejected, "
                            "length bounds, known attributes and their balance.")
def preference_pairs_suite(context: dg.AssetCheckExecutionContext, settings: VasSettings,
                           duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return run_suite_check(context, settings, duckdb, "preference_pairs", "pairs")


@dg.asset_check(asset="base_model", blocking=False,
                description="pi0's samples spread across sentiment and mostly end with EOS (a warning).")
def base_model_samples_vary(context: dg.AssetCheckExecutionContext, settings: VasSettings,
                            duckdb: DuckDBResource) -> dg.AssetCheckResult:
    params = settings.params()["validation"]
    event = context.instance.get_latest_materialization_event(dg.AssetKey("base_model"))
    if event is None or event.asset_materialization is None:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "base_model has no materialization"})
    meta = event.asset_materialization.metadata
    std = float(meta["sample_positivity_std"].value)
    clean = float(meta["sample_clean_end_fraction"].value)
    passed = std >= params["min_sample_positivity_std"] and clean >= params["min_clean_end_fraction"]
    record_check(context, settings, duckdb, "base_model_samples_vary", "base_model", passed,
                 {"positivity_std": std, "clean_end_fraction": clean})
    return dg.AssetCheckResult(
        passed=passed, severity=dg.AssetCheckSeverity.WARN,
        metadata={"positivity_std": std, "min_positivity_std": params["min_sample_positivity_std"],
                  "clean_end_fraction": clean, "min_clean_end_fraction": params["min_clean_end_fraction"]},
    )
