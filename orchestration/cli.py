"""The `vas` command line: run the pipeline, materialize one asset (DVC stages), validate a file."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from orchestration.profiles import PROJECT_ROOT

# Nothing phones out: set before dagster, dvc or great_expectations are imported.
QUIET_ENV = {"DAGSTER_DISABLE_TELEMETRY": "1", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "False"}


def prepare_environment() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(PROJECT_ROOT / "orchestration" / "dagster.yaml", home / "dagster.yaml")


def materialize(selection: list[str] | None, profile: str | None, data_dir: str | None = None):
    """Materialize assets (all when selection is None) with their checks, in the persistent instance."""
    prepare_environment()
    if profile:
        os.environ["VAS_PROFILE"] = profile
    if data_dir:
        os.environ["VAS_DATA_DIR"] = data_dir
    import dagster as dg

    from orchestration.definitions import ALL_ASSETS, ALL_CHECKS
    from orchestration.resources import build_resources

    resources = build_resources()
    settings = resources["settings"]
    instance = dg.DagsterInstance.get()
    # Selections are built as objects: dvc pins antlr4 4.9 (through hydra), which cannot load
    # the parser Dagster uses for selection strings.
    return dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=dg.AssetSelection.assets(*selection) if selection else None,
        resources=resources,
        instance=instance,
        tags={"vas/profile": settings.profile},
        raise_on_error=False,
    ), settings


def _summarize(result, settings) -> None:
    import dagster as dg

    print(f"\nprofile {settings.profile}; results under {settings.root}")
    print(f"metrics and lineage: {settings.path('metrics.duckdb')}; run {result.run_id} in "
          f"{os.environ['DAGSTER_HOME']} (see `make ui`)")
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        meta = {k: v.value for k, v in mat.metadata.items()
                if isinstance(v, (dg.FloatMetadataValue, dg.IntMetadataValue))}
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(meta.items())[:8])
        print(f"  {mat.asset_key.to_user_string():18s} {shown}")
    for check in result.get_asset_check_evaluations():
        status = "passed" if check.passed else f"FAILED ({check.severity.value})"
        print(f"  check {check.check_name:28s} {status}")


def dvc_commit() -> None:
    """Record the outputs just produced in dvc.lock and the DVC cache, as `dvc repro` would."""
    if not (PROJECT_ROOT / ".dvc").is_dir():
        return
    dvc = Path(sys.executable).with_name("dvc")
    proc = subprocess.run([str(dvc), "commit", "--force", "--quiet"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"warning: dvc commit failed: {proc.stderr.strip()}", file=sys.stderr)
    else:
        print("dvc.lock updated with the md5 of every output (dvc status shows them up to date)")


def cmd_run(args) -> int:
    start = time.perf_counter()
    result, settings = materialize(None, args.profile, args.data_dir)
    _summarize(result, settings)
    print(f"wall time {time.perf_counter() - start:.1f} s")
    if not result.success:
        print("run FAILED: see the run log in the Dagster UI (`make ui`)", file=sys.stderr)
        return 1
    if args.dvc_commit and not args.data_dir:
        dvc_commit()
    return 0


def cmd_materialize(args) -> int:
    result, settings = materialize(args.assets, args.profile, args.data_dir)
    _summarize(result, settings)
    return 0 if result.success else 1


def cmd_validate(args) -> int:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    from models.validation import ValidationRules, cli_validate
    from orchestration.profiles import load_profile

    rules = ValidationRules.from_params(load_profile(args.profile)["validation"])
    return cli_validate(args.file, kind=args.kind, quarantine_dir=args.quarantine, rules=rules)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vas", description="Value Augmented Sampling pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the whole asset graph")
    run.add_argument("--profile", default=None, help="params.yaml profile (default: $VAS_PROFILE or 'default')")
    run.add_argument("--data-dir", default=None, help="data folder (default: data/)")
    run.add_argument("--no-dvc-commit", dest="dvc_commit", action="store_false",
                     help="do not record the outputs in dvc.lock")
    run.set_defaults(func=cmd_run)

    mat = sub.add_parser("materialize", help="materialize some assets (used by dvc.yaml stages)")
    mat.add_argument("assets", nargs="+", help="asset names, e.g. corpus base_model")
    mat.add_argument("--profile", default=None)
    mat.add_argument("--data-dir", default=None)
    mat.set_defaults(func=cmd_materialize)

    val = sub.add_parser("validate", help="validate a prompts or preference-pairs file")
    val.add_argument("file")
    val.add_argument("--kind", choices=["pairs", "prompts"], default=None, help="default: from the columns")
    val.add_argument("--quarantine", default=None, metavar="DIR", help="also write bad rows to DIR")
    val.add_argument("--profile", default=None, help="profile whose validation rules apply")
    val.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
