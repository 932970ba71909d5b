"""Group `ingest`: preference files delivered to data/incoming/, merged into one validated table.

The `incoming_preferences_sensor` (orchestration/sensors.py) validates each new file and, for a
file that passes, launches a run of this asset (with the file in its config) and everything
downstream: preference_pairs merges the imported rows, and the reward models, rollouts, value
models and evaluation retrain on them. A file that fails never gets here: the sensor records
a failed `imported_preferences_suite` check with its reasons instead.
"""

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import List

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from assets.resources import VasSettings
from assets.stage import Produced, StageRun, pipeline_asset
from assets.validation import problems_table, run_suite_check
from models.artifacts import write_folder
from models.data.ingest import empty_imported, read_incoming
from models.data.validation import ValidationRules

GROUP = "ingest"
CHECK_NAME = "imported_preferences_suite"


class ImportedPreferencesConfig(dg.Config):
    files: List[str] = []  # incoming files to merge in this run (paths); none: keep what was merged


# Never re-used: each run merges the files it is given (a file already merged is skipped).
@pipeline_asset("imported_preferences", ImportedPreferencesConfig, reusable=False, group_name=GROUP,
                kinds={"parquet"}, pool="duckdb_writer",
                description="Every preference pair delivered through data/incoming/ and accepted by validation, "
                            "with the md5, name and row of its file; merged into preference_pairs.")
def imported_preferences(run: StageRun) -> Produced:
    rules = ValidationRules.from_params(run.params["validation"])
    folder = run.path("imported_preferences")
    existing = pd.read_parquet(folder / "pairs.parquet") if (folder / "pairs.parquet").exists() else empty_imported()
    sources = json.loads((folder / "sources.json").read_text()) if (folder / "sources.json").exists() else []
    known = {s["md5"] for s in sources}
    new_frames, added = [], []
    for name in run.config.files:
        path = Path(name)
        rows, report, quarantined = read_incoming(path, rules, run.settings.path("quarantine"))
        if not report.success:
            # The sensor screens files first; this guards a file launched by hand from the launchpad.
            raise dg.Failure(description=f"{report.summary()}; nothing was merged",
                             metadata={"problems": dg.MetadataValue.md(problems_table([vars(p) for p in report.problems])),
                                       "quarantine_file": str(quarantined)})
        md5 = rows["source_md5"].iloc[0]
        if md5 in known:
            run.log.info(f"{path.name}: already merged (md5 {md5}), skipped")
            continue
        known.add(md5)
        new_frames.append(rows)
        added.append({"file": str(path), "name": path.name, "md5": md5, "n_pairs": len(rows),
                      "run_id": run.context.run_id,
                      "merged_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        run.log.info(f"{path.name}: {len(rows)} pairs accepted (md5 {md5})")
    # `known` kept each file (md5) to one merge, across runs and within this one.
    merged = pd.concat([existing, *new_frames], ignore_index=True)
    if added or not folder.exists():  # nothing new: the table and its data version stay as they are
        write_folder(folder, {
            "pairs.parquet": merged,
            "sources.json": sources + added,
            # What the last merge read, for the blocking check (same shape as the other imports').
            "validation.json": {"source": ", ".join(a["name"] for a in added) or "(no files yet)",
                                "n_rows": int(sum(a["n_pairs"] for a in added)), "bad_rows": [], "problems": []},
        })
    metrics = {"n_pairs": len(merged), "n_files": len(sources) + len(added), "n_new_files": len(added),
               "n_new_pairs": int(sum(a["n_pairs"] for a in added))}
    # What this materialization is made of: the files it merged (the merged table is its output).
    return Produced(metrics, params={"files": sorted(a["md5"] for a in added)},
                    metadata={"new_files": dg.MetadataValue.json(added),
                              "preview": dg.MetadataValue.md(merged.tail(6).to_markdown(index=False))})


@dg.asset_check(asset="imported_preferences", name=CHECK_NAME, blocking=True,
                description="GX suite on the merged imported pairs (also recorded, failed, by the incoming "
                            "sensor for a file it rejects, with the file's row-level reasons).")
def imported_preferences_suite(context: dg.AssetCheckExecutionContext, settings: VasSettings,
                               duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return run_suite_check(context, settings, duckdb, "imported_preferences", "pairs", allow_empty=True)
