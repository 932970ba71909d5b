"""Group `evaluation`: the report: frontier and composition plots and the headline table, in the UI."""

import base64
import json
from pathlib import Path

import dagster as dg
import pandas as pd

from assets.evaluation import WORLD_FILE
from assets.stage import Produced, StageRun, pipeline_asset
from models.artifacts import atomic_path


def _png_markdown(path) -> dg.MetadataValue:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return dg.MetadataValue.md(f"![{path.stem}](data:image/png;base64,{data})")


def study_files(settings) -> list[str]:
    """The seed study's files (`vas study`), when there is one: the verdict comes from them."""
    study_dir = settings.path("study")
    return [str(study_dir / f) for f in ("aggregate.parquet", "study.parquet")] \
        if (study_dir / "aggregate.parquet").exists() else []


def serving_file(settings) -> list[str]:
    """bench/serve.py's throughput numbers (`make bench-serve`), when measured: a section of the report."""
    path = settings.path("bench", "serve.json")
    return [str(path)] if path.exists() else []


@pipeline_asset("report", sources=lambda settings, params: study_files(settings) + serving_file(settings),
                group_name="evaluation",
                kinds={"python"}, pool="duckdb_writer",
                description="Reward-vs-KL frontier, composition grid and cost plots, and the headline table with "
                            "a computed verdict: does VAS reach Best-of-128, and at what cost; the value models' "
                            "error against Monte-Carlo estimates; serving throughput when bench/serve.py measured it.")
def report(run: StageRun) -> Produced:
    # torch-backed modules load inside the assets that use them: `dagster dev` loads these definitions without torch
    from models.evaluation.evaluation import headline_table
    from models.evaluation.report import ReportConfig, report_verdict, targets_section, write_report
    from models.evaluation.value_error import markdown_table

    max_kl = run.config_for(ReportConfig, ignore=("seed",)).verdict_max_kl
    study_dir = run.settings.path("study")
    study = study_files(run.settings)
    summary = pd.read_parquet(run.path("evaluation") / "summary.parquet")
    value_error = pd.read_parquet(run.path("value_error") / "value_error.parquet")
    with atomic_path(run.path("report")) as tmp:
        tmp.mkdir()
        text = report_verdict(summary, study_dir if study else None, max_kl)
        per_seed = pd.read_parquet(study_dir / "study.parquet") if study else None
        world_file = run.path("evaluation") / WORLD_FILE
        serving = serving_file(run.settings)
        write_report(summary, tmp, verdict_text=text, value_error=value_error, per_seed=per_seed,
                     world=json.loads(world_file.read_text()) if world_file.exists() else None,
                     serving=json.loads(Path(serving[0]).read_text()) if serving else None, max_kl=max_kl)
    folder = run.path("report")
    run.log.info(text)
    metadata = {
        "verdict": text,
        "verdict_from": "seed study" if study else "single run",
        "headline": dg.MetadataValue.md(headline_table(summary)),
        "frontier": _png_markdown(folder / "frontier.png"),
        "composition": _png_markdown(folder / "composition.png"),
        "cost": _png_markdown(folder / "cost.png"),
        "value_error": dg.MetadataValue.md(markdown_table(value_error)),
        "targets": dg.MetadataValue.md(targets_section(summary, per_seed, value_error)),
        "report_file": dg.MetadataValue.path(str(folder / "report.md")),
    }
    return Produced({"n_methods": len(summary)}, metadata=metadata)
