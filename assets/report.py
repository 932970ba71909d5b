"""Group `evaluation`: the report: frontier and composition plots and the headline table, in the UI."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from assets.common import finish, lineage_inputs, output_path, reuse
from assets.resources import VasSettings
from models.stages import STAGES


def _png_markdown(path) -> dg.MetadataValue:
    import base64

    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return dg.MetadataValue.md(f"![{path.stem}](data:image/png;base64,{data})")


@dg.asset(group_name="evaluation", deps=STAGES["report"].upstream, kinds={"python"}, pool="duckdb_writer",
          description="Reward-vs-KL frontier, composition grid and cost plots, and the headline table with "
                      "a computed verdict: does VAS reach Best-of-128, and at what cost; the value models' "
                      "error against Monte-Carlo estimates.")
def report(context: dg.AssetExecutionContext, settings: VasSettings, duckdb: DuckDBResource) -> dg.MaterializeResult:
    import pandas as pd

    from models.artifacts import atomic_path
    from models.evaluation import headline_table
    from models.report import report_verdict, targets_section, write_report
    from models.value_error import markdown_table

    # The verdict comes from the seed study (`vas study`) when there is one: its files are inputs.
    study_dir = settings.path("study")
    study = [str(study_dir / f) for f in ("aggregate.parquet", "study.parquet")] \
        if (study_dir / "aggregate.parquet").exists() else []
    inputs = lineage_inputs(settings, ["evaluation", "value_error"], source=study)
    if (reused := reuse(context, settings, duckdb, "report", {}, inputs)) is not None:
        return reused
    summary = pd.read_parquet(output_path(settings, "evaluation") / "summary.parquet")
    value_error = pd.read_parquet(output_path(settings, "value_error") / "value_error.parquet")
    with atomic_path(output_path(settings, "report")) as tmp:
        tmp.mkdir()
        text = report_verdict(summary, study_dir if study else None)
        per_seed = pd.read_parquet(study_dir / "study.parquet") if study else None
        write_report(summary, tmp, verdict_text=text, value_error=value_error, per_seed=per_seed)
    folder = output_path(settings, "report")
    context.log.info(text)
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
    return finish(context, settings, duckdb, "report", {}, {"n_methods": len(summary)}, inputs=inputs,
                  metadata=metadata)
