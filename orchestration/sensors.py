"""The new-data sensor: preference files dropped into data/incoming/ trigger a validated retrain.

Each tick hashes the files in data/incoming/ and looks only at contents it has not seen (the
cursor holds every md5 it processed, so a file is never processed twice, renamed or not; a file
edited in place is new content and is looked at again). A new file is validated on the spot:

- it passes: one run of `incoming_retrain` merges it (imported_preferences) and retrains
  everything downstream of the preference pairs on the merged data;
- it fails: no run; a failed `imported_preferences_suite` check is recorded with the file's
  row-level reasons (visible on the asset in the UI), and its bad rows go to data/quarantine/.

The files themselves are never moved or modified.
"""

from __future__ import annotations

import json

import dagster as dg

from assets.ingest import CHECK_NAME
from assets.resources import VasSettings
from assets.validation import problems_table
from models.artifacts import file_md5
from models.data.ingest import incoming_files, read_incoming
from models.data.validation import ValidationRules
from models.environment import read_env

incoming_retrain = dg.define_asset_job(
    "incoming_retrain",
    selection=dg.AssetSelection.assets("imported_preferences").downstream(),
    description="Merge validated incoming preference files, then retrain reward models, rollouts, value "
                "models (a new version beside the old ones), the DPO baseline, evaluation and report.",
)


def settle_seconds() -> float:
    """How long a file must sit unmodified before it is read (a copy may still be under way)."""
    return read_env().incoming_settle_seconds


def _failed_check(path, md5: str, report, quarantined) -> dg.AssetCheckEvaluation:
    problems = [vars(p) for p in report.problems]
    metadata = {
        "file": str(path),
        "file_md5": md5,
        "summary": report.summary(),
        "n_rows": dg.MetadataValue.int(int(report.n_rows)),
        "n_bad_rows": dg.MetadataValue.int(len(report.bad_rows)),
        "problems": dg.MetadataValue.md(problems_table(problems)),
    }
    if quarantined is not None:
        metadata["quarantine_file"] = dg.MetadataValue.path(str(quarantined))
    return dg.AssetCheckEvaluation(asset_key=dg.AssetKey("imported_preferences"), check_name=CHECK_NAME,
                                   passed=False, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata,
                                   description=f"rejected {path.name}: {report.summary()}")


@dg.sensor(
    job=incoming_retrain,
    minimum_interval_seconds=30,
    default_status=(dg.DefaultSensorStatus.STOPPED if read_env().incoming_sensor == "off"
                    else dg.DefaultSensorStatus.RUNNING),
    description="Validates preference files dropped into data/incoming/; retrains on the merged data when "
                "they pass, records a failed imported_preferences_suite check when they do not.",
)
def incoming_preferences_sensor(context: dg.SensorEvaluationContext, settings: VasSettings):
    processed: dict[str, str] = json.loads(context.cursor) if context.cursor else {}  # md5 -> file name
    folder = settings.path("incoming")
    rules = ValidationRules.from_params(settings.params()["validation"])
    accepted, rejected = [], []
    for path in incoming_files(folder, settle_seconds()):
        md5 = file_md5(path)
        if md5 in processed:
            continue
        processed[md5] = path.name
        # An unreadable file fails like a bad one, and is not retried until its content changes.
        rows, report, quarantined = read_incoming(path, rules, settings.path("quarantine"))
        if report.success:
            context.log.info(f"{path.name}: {len(rows)} pairs pass validation (md5 {md5})")
            accepted.append((path, md5))
        else:
            context.log.warning(f"{path.name}: {report.summary()}; no retrain")
            rejected.append(_failed_check(path, md5, report, quarantined))
    cursor = json.dumps(processed, sort_keys=True)
    if not accepted and not rejected:
        return dg.SensorResult(skip_reason=f"no new files in {folder}", cursor=cursor)
    run_requests = []
    if accepted:
        run_requests.append(dg.RunRequest(
            # The run key is the set of contents merged: the same files never launch two retrains.
            run_key="incoming-" + "-".join(md5[:12] for _, md5 in accepted),
            run_config={"ops": {"imported_preferences": {"config": {"files": [str(p) for p, _ in accepted]}}}},
            tags={"vas/incoming": ",".join(p.name for p, _ in accepted)},
        ))
    return dg.SensorResult(run_requests=run_requests, asset_events=rejected, cursor=cursor)
