"""The `vas` command line: run the pipeline, materialize one asset (DVC stages), validate a file."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from assets.metrics_db import metric_row, write_rows
from models.decoding.generate import decode_configs, generate
from models.decoding.upstream import UpstreamConfig, UpstreamError
from models.environment import read_env, set_env
from models.profiles import PROJECT_ROOT, load_profile, project_path
from models.progress import decide_auto, progress_bar
from models.stages import STAGES, output_of
from orchestration.serve_ops import ServeOptions

# Nothing phones out: set before dagster, dvc or great_expectations are imported.
QUIET_ENV = {"DAGSTER_DISABLE_TELEMETRY": "1", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "False"}


def prepare_environment() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(PROJECT_ROOT / "orchestration" / "dagster.yaml", home / "dagster.yaml")


def resolve_data_dir(data_dir: str | None) -> Path:
    """--data-dir, else $VAS_DATA_DIR, else data/; relative to the project root, as VasSettings.root."""
    return project_path(data_dir or read_env().data_dir)


def use_profile(profile: str | None, data_dir: str | None) -> None:
    """Quiet environment, then the profile and data folder every later settings_from_env() sees."""
    prepare_environment()
    if profile:
        set_env(profile=profile)
    if data_dir:
        set_env(data_dir=data_dir)


def materialize(selection: list[str] | None, profile: str | None, data_dir: str | None = None,
                force: bool = False, run_config: dict | None = None, tags: dict | None = None,
                seed: int | None = None):
    """Materialize assets (all when selection is None) with their checks, in the persistent instance.
    An asset whose inputs, params and code are unchanged re-uses its output unless force.
    seed replaces the profile's seed for every asset of the run (`vas study`)."""
    use_profile(profile, data_dir)
    # dagster, pandas and the asset graph load inside the commands that need them: `vas --help` starts at once,
    # and QUIET_ENV is set before dagster loads
    import dagster as dg

    from assets.common import FORCE_TAG
    from assets.resources import build_resources, settings_from_env
    from assets.rollouts import all_shards_tags
    from orchestration.definitions import ALL_ASSETS, ALL_CHECKS
    from orchestration.recovery import launch_tags, recover_dead_runs, remove_dead_temporaries

    resources = build_resources(settings_from_env(seed))
    settings = resources["settings"]
    instance = dg.DagsterInstance.get()
    # torch before the run: a SIGTERM or Ctrl-C that lands while a step imports it (its C++ start-up)
    # aborts the process instead of failing the run, or is swallowed by an import-time `except:`.
    import torch  # noqa: F401

    # A run killed before it could end holds its pool slots until someone frees them, and leaves its
    # half-written temporaries behind: this launch clears both.
    recover_dead_runs(instance)
    remove_dead_temporaries(instance, settings.root)
    # Selections are built as objects: dvc pins antlr4 4.9 (through hydra), which cannot load
    # the parser Dagster uses for selection strings.
    return dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=dg.AssetSelection.assets(*selection) if selection else None,
        resources=resources,
        instance=instance,
        # rollout_shards, when selected, materializes every shard (its partitions) in one step of this run.
        tags={"vas/profile": settings.profile, **({FORCE_TAG: "true"} if force else {}),
              **(all_shards_tags() if not selection or "rollout_shards" in selection else {}),
              **({"vas/seed": str(seed)} if seed is not None else {}), **launch_tags(), **(tags or {})},
        run_config=run_config,
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
        reused = mat.metadata.get("reused_from_run")
        if reused is not None:
            shown = f"unchanged, re-used from run {reused.value[:8]}; " + shown
        print(f"  {mat.asset_key.to_user_string():20s} {shown}")
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
    result, settings = materialize(None, args.profile, args.data_dir, args.force)
    _summarize(result, settings)
    print(f"wall time {time.perf_counter() - start:.1f} s")
    if not result.success:
        print("run FAILED: see the run log in the Dagster UI (`make ui`)", file=sys.stderr)
        return 1
    summary_file = settings.path("eval", "summary.parquet")
    if summary_file.exists():
        import pandas as pd

        from models.evaluation.evaluation import headline_table

        print(f"\nheadline ({summary_file}; every sample in {summary_file.with_name('samples.parquet')}):")
        print(headline_table(pd.read_parquet(summary_file)))
    # dvc.yaml's outputs are data/'s: another data folder (--data-dir, $VAS_DATA_DIR) is not DVC's to record.
    if args.dvc_commit and settings.root.resolve() == (PROJECT_ROOT / "data").resolve():
        dvc_commit()
    return 0


def cmd_materialize(args) -> int:
    result, settings = materialize(args.assets, args.profile, args.data_dir, args.force)
    _summarize(result, settings)
    return 0 if result.success else 1


def cmd_ingest(args) -> int:
    """What the incoming sensor does, for given files and without the daemon: validate each,
    then one incoming_retrain run on those that pass."""
    use_profile(args.profile, args.data_dir)
    from assets.resources import settings_from_env
    from models.data.ingest import read_incoming
    from models.data.validation import ValidationRules

    settings = settings_from_env()
    rules = ValidationRules.from_params(settings.params()["validation"])
    accepted, failed = [], 0
    for name in args.files:
        path = Path(name).resolve()
        rows, report, quarantined = read_incoming(path, rules, settings.path("quarantine"))
        if report.success:
            print(f"{path}: {len(rows)} pairs pass validation")
            accepted.append(str(path))
        else:
            failed += 1
            print(report.summary(), file=sys.stderr)
            for problem in report.problems:
                print(f"  {problem}", file=sys.stderr)
            if quarantined:
                print(f"  bad rows quarantined to {quarantined}", file=sys.stderr)
    if not accepted:
        print("vas ingest: no file passed validation; no retrain", file=sys.stderr)
        return 1
    from orchestration.definitions import defs

    job = defs.resolve_job_def("incoming_retrain")
    selection = sorted(k.to_user_string() for k in job.asset_layer.selected_asset_keys)
    result, settings = materialize(selection, args.profile, args.data_dir,
                                   run_config={"ops": {"imported_preferences": {"config": {"files": accepted}}}},
                                   tags={"vas/incoming": ",".join(Path(a).name for a in accepted)})
    _summarize(result, settings)
    return 0 if result.success and not failed else 1


# What `vas study` retrains per seed; the outputs upstream of them are copied from the main run.
STUDY_RETRAINS = ["rollout_shards", "rollouts", "value_models", "evaluation"]


def study_upstream() -> dict[str, str]:
    """The assets upstream of STUDY_RETRAINS (not retrained by the study) and their outputs."""
    import dagster as dg

    from orchestration.definitions import defs

    keys = dg.AssetSelection.assets(*STUDY_RETRAINS).upstream().resolve(defs.resolve_asset_graph())
    names = {k.to_user_string() for k in keys} - set(STUDY_RETRAINS)
    return {name: stage.output for name, stage in STAGES.items() if name in names}


def _copy_upstream(settings, folder: Path, outputs: dict[str, str]) -> None:
    """Put the main run's outputs the study does not retrain into a seed's data folder."""
    for relative in outputs.values():
        source, target = settings.path(relative), folder / relative
        if target.is_dir():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)


def cmd_study(args) -> int:
    """Retrain rollouts, value models and evaluation once per seed on the main run's upstream
    outputs, under data/study/seed_<s>/ (the main run's own seed re-uses the main run); aggregate
    the evaluation summaries across seeds (data/study/), record them in the main DuckDB (asset
    seed_study) and refresh the report."""
    seeds = list(dict.fromkeys(args.seeds))
    if not seeds:
        print("vas study: give at least one seed (--seeds 0 1 2)", file=sys.stderr)
        return 2
    use_profile(args.profile, args.data_dir)
    import pandas as pd

    from assets.common import git_sha
    from assets.resources import duckdb_for, settings_from_env
    from models.artifacts import atomic_path, dvc_md5
    from models.evaluation.study import STUDY_METRICS, aggregate, lift_ratio, study_markdown
    from models.evaluation.targets import study_markdown as targets_markdown

    settings = settings_from_env()
    upstream = study_upstream()
    missing = [path for path in upstream.values() if not settings.path(path).exists()]
    if missing:
        print(f"vas study: the study re-uses the main run's outputs, but {', '.join(missing)} "
              f"{'is' if len(missing) == 1 else 'are'} missing under {settings.root}: run `make run` "
              f"(or `vas run`) first", file=sys.stderr)
        return 2
    summaries = []
    run_seed = int(settings.params()["seed"])
    for seed in progress_bar(seeds, "study seeds", unit="seed"):
        if seed == run_seed:
            # The main run is this seed's run (same seed, data and code give the same numbers,
            # tests/test_determinism.py): its outputs are re-used where unchanged, brought up to date
            # where not, instead of retrained in a copy.
            folder = settings.root
            print(f"\nseed {seed}: the main run's seed; {', '.join(STUDY_RETRAINS)} re-used from {folder} "
                  f"where unchanged")
            result, seed_settings = materialize(STUDY_RETRAINS, settings.profile, str(folder), args.force,
                                                tags={"vas/study": "true"})
        else:
            folder = settings.path("study", f"seed_{seed}")
            _copy_upstream(settings, folder, upstream)
            print(f"\nseed {seed}: retraining {', '.join(STUDY_RETRAINS)} in {folder}")
            result, seed_settings = materialize(STUDY_RETRAINS, settings.profile, str(folder), args.force,
                                                tags={"vas/study": "true"}, seed=seed)
        _summarize(result, seed_settings)
        if not result.success:
            print(f"vas study: seed {seed} FAILED: see the run log in the Dagster UI (`make ui`)", file=sys.stderr)
            return 1
        summary = pd.read_parquet(folder / output_of("evaluation") / "summary.parquet")
        summaries.append(summary.assign(seed=seed))
    # materialize() pointed the process at the last seed's folder: the rest is the main run's.
    set_env(data_dir=settings.data_dir)

    per_seed = pd.concat(summaries, ignore_index=True)
    per_seed = per_seed[["seed", *[c for c in per_seed.columns if c != "seed"]]]
    table, ratio = aggregate(per_seed), lift_ratio(per_seed, settings.params()["report"]["verdict_max_kl"])
    text = study_markdown(table, ratio) + "\n" + targets_markdown(per_seed)
    out = settings.path("study")
    for name, frame in (("study.parquet", per_seed), ("aggregate.parquet", table)):
        with atomic_path(out / name) as tmp:
            frame.to_parquet(tmp, index=False)
    (out / "study.md").write_text(text, encoding="utf-8")

    rows = []
    for _, row in table.iterrows():
        method_params = {"method": row.method, **json.loads(row.params)}
        for metric in [m for m in STUDY_METRICS if m in table]:
            for stat, column in (("seed_mean", metric), ("seed_sd", f"{metric}_sd")):
                if pd.notna(row[column]):
                    rows.append(metric_row(f"{metric}/{stat}", row[column], split="eval", method=row.method,
                                           params=method_params))
        rows.append(metric_row("n_seeds", row.n_seeds, split="eval", method=row.method, params=method_params))
    for key in ("ratio_mean", "ratio_sd", "cost_vs_bon_mean", "cost_vs_bon_sd", "vas_kl_mean", "vas_kl_sd",
                "args_ratio_mean", "args_ratio_sd", "args_cost_vs_bon_mean", "args_cost_vs_bon_sd",
                "n_with_args", "n_beats_args"):
        if pd.notna(ratio[key]):
            rows.append(metric_row(f"vas_bon_lift_{key}", ratio[key], split="eval"))
    for s in ratio["per_seed"]:
        if pd.notna(s["ratio"]):
            rows.append(metric_row("vas_bon_lift_ratio", s["ratio"], split="eval", method="vas",
                                   params={"seed": s["seed"], **json.loads(s["vas_params"])}))
    run_id = f"study-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    with duckdb_for(settings).get_connection() as conn:
        write_rows(conn, run_id=run_id, asset="seed_study", metrics=rows,
                   params={"seeds": seeds, "profile": settings.profile, "retrained": STUDY_RETRAINS},
                   data_version=dvc_md5(out / "study.parquet"), model_version=None, git_sha=git_sha())
    print(f"\n{text}")
    print(f"per-seed summaries {out / 'study.parquet'}, aggregate {out / 'aggregate.parquet'}, "
          f"{out / 'study.md'}; DuckDB run {run_id} (asset seed_study) in {settings.path('metrics.duckdb')}")
    return refresh_report(settings.data_dir, settings.profile, "vas study")


def refresh_report(data_dir: str | Path, profile: str, caller: str) -> int:
    """Re-materialize a data folder's report after something it reads changed beside the pipeline
    (a seed study, a serving benchmark); nothing to refresh before the folder has an evaluation."""
    data = Path(data_dir)
    if not (data / output_of("evaluation") / "summary.parquet").exists():
        print(f"{caller}: no evaluation under {data}: the report is not refreshed")
        return 0
    result, _ = materialize(["report"], profile, str(data))
    if not result.success:
        print(f"{caller}: the report did not refresh: see the run log (`make ui`)", file=sys.stderr)
        return 1
    print(f"{caller}: report refreshed: {data / output_of('report') / 'report.md'}")
    return 0


def cmd_validate(args) -> int:
    from models.data.validation import ValidationRules

    rules = ValidationRules.from_params(load_profile(args.profile)["validation"])
    return validate_file(args.file, kind=args.kind, quarantine_dir=args.quarantine, rules=rules)


def validate_file(path: str, kind: str | None = None, quarantine_dir: str | None = None, rules=None) -> int:
    """`vas validate FILE`: print every problem as "FILE: row N, column 'C': reason", then a
    summary line; with quarantine_dir, also write the bad rows there. Returns 0 when the file
    passes, 1 otherwise. The file is only read."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    from models.data.validation import check_file, printable

    if not Path(path).is_file():
        print(f"{path}: no such file", file=sys.stderr)
        return 1
    try:
        report, n_bad, written = check_file(path, kind, rules, quarantine_dir)
    except (ValueError, OSError) as exc:
        print(printable(str(exc)), file=sys.stderr)
        return 1
    for problem in report.problems:
        print(problem)
    print(report.summary())
    if written is not None:
        print(f"{path}: {n_bad} bad rows written to {written}")
    return 0 if report.success else 1


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _weight(text: str) -> tuple[str, float]:
    """--weight ATTR=NUMBER, e.g. positivity=2."""
    name, value = _assignment(text)
    try:
        weight = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"weight for {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"weight for {name!r} must be finite, got {value!r}")
    return name, weight


def _upstream(args) -> UpstreamConfig | None:
    """--upstream URL --upstream-model NAME [...]: black-box VAS on a base model behind an API."""
    if not args.upstream:
        return None
    if not args.upstream_model:
        raise UpstreamError(f"--upstream {args.upstream} needs --upstream-model NAME, the model it serves")
    return UpstreamConfig(args.upstream, args.upstream_model, top_k=args.upstream_top_k,
                          max_retries=args.upstream_retries, timeout=args.upstream_timeout,
                          eos_token_id=args.upstream_eos_id, concurrency=args.upstream_concurrency,
                          cache_prompt=True if args.upstream_cache_prompt else None)


def add_upstream_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("black-box base model (top-k logprobs from an OpenAI-compatible server)")
    group.add_argument("--upstream", default=None, metavar="URL",
                       help="base URL of an OpenAI-compatible /v1/completions, e.g. http://127.0.0.1:8080/v1")
    group.add_argument("--upstream-model", default=None, metavar="NAME", help="the model name it serves")
    group.add_argument("--upstream-top-k", type=int, default=UpstreamConfig.top_k,
                       help=f"logprobs asked per token (default {UpstreamConfig.top_k}; the public OpenAI API allows 5)")
    group.add_argument("--upstream-eos-id", type=int, default=None,
                       help="the upstream's EOS token id: biased away from its own one-token draws (logit_bias)")
    group.add_argument("--upstream-retries", type=int, default=UpstreamConfig.max_retries,
                       help="retries with backoff on 429, 5xx and timeouts (the openai client's)")
    group.add_argument("--upstream-timeout", type=float, default=UpstreamConfig.timeout, help="seconds per request")
    group.add_argument("--upstream-concurrency", type=int, default=UpstreamConfig.concurrency,
                       help="upstream requests in flight at once, over every row and request (default %(default)s)")
    group.add_argument("--upstream-cache-prompt", action="store_true",
                       help="send cache_prompt: true, so llama.cpp's server re-uses the KV cache of a re-sent prefix")


def cmd_generate(args) -> int:
    data_dir = resolve_data_dir(args.data_dir)
    try:
        # None keeps the decoder's own default (SamplingConfig, VASConfig): declared there only.
        decode = dict(seed=args.seed, top_k=args.top_k, min_p=args.min_p, temperature=args.temperature,
                      max_new_tokens=args.max_new_tokens, soft=False if args.mean else None,
                      calibrated=True if args.calibrated else None)
        rows = generate(args.prompt, dict(args.weight), n=args.n, data_dir=data_dir,
                        value_model_dirs=dict(args.value_model), device=args.device, upstream=_upstream(args),
                        **decode)
    except (ValueError, FileNotFoundError, UpstreamError) as err:   # bad weights, missing models: say what to do
        print(f"vas generate: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    weights = ", ".join(f"{k}={v:g}" for k, v in args.weight) or "none (base sampling)"
    sampling, vas = decode_configs(**decode)
    decoder = ("calibrated mean values" if vas.calibrated else "soft values" if vas.soft else "mean values")
    print(f"weights: {weights}; top-k {vas.top_k}, min-p {vas.min_p:g}, {decoder}, temperature {sampling.temperature:g}, "
          f"seed {sampling.seed}")
    for i, row in enumerate(rows):
        if i % args.n == 0:
            print(f"\nprompt: {row['prompt']}")
        learned = "".join(f"  {k}={v:.3f}" for k, v in row.items() if k.startswith("learned_"))
        print(f"  [{i % args.n + 1}] kl={row['kl_nats']:.3f} nats  tokens={row['n_tokens']}{learned}")
        print(f"      {row['prompt']}{row['completion']}")
    return 0


def cmd_serve(args) -> int:
    from orchestration.serve import serve  # fastapi, torch: only when serving

    data_dir = resolve_data_dir(args.data_dir)
    logging.basicConfig(level=logging.INFO)
    try:
        upstream = _upstream(args)
    except (UpstreamError, ValueError) as err:
        print(f"vas serve: {err}", file=sys.stderr)
        return 2
    options = ServeOptions(api_key=args.api_key or os.environ.get("VAS_API_KEY") or None, max_queued=args.max_queued,
                           request_timeout=args.request_timeout or None, shutdown_timeout=args.shutdown_timeout)
    serve(data_dir, host=args.host, port=args.port, device=args.device, model_id=args.model_name,
          upstream=upstream, max_batch_rows=args.max_batch_rows, max_batch_tokens=args.max_batch_tokens,
          options=options)
    return 0


def cmd_export_gguf(args) -> int:
    """`vas export-gguf`: the base model (or any saved GPT-2 folder) as one f32 GGUF file for llama.cpp."""
    from models.lm.gguf_export import GGUFExportError, export_gguf
    from models.lm.lm import base_model_dir

    data_dir = resolve_data_dir(args.data_dir)
    try:
        # The base_model asset's folder may only pin a model kept elsewhere: export the weights it pins.
        model_dir = Path(args.model_dir) if args.model_dir else base_model_dir(data_dir / output_of("base_model"))
        out = Path(args.out) if args.out else data_dir / "base_model.gguf"
        written = export_gguf(model_dir, out)
    except (GGUFExportError, FileNotFoundError) as err:
        print(f"vas export-gguf: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written['path']} ({written['bytes'] / 1e6:.1f} MB): gpt2, {written['n_tensors']} f32 tensors, "
          f"{written['n_vocab']} tokens, {written['n_merges']} merges, context {written['context_length']}, "
          f"bos {written['bos']}, eos {written['eos']} (from {model_dir})")
    print(f"serve it (`make llamacpp` first): .venv-llamacpp/bin/python -m llama_cpp.server --model {written['path']} "
          f"--host 127.0.0.1 --port 8080 --n_ctx {written['context_length']} --type_k 0 --type_v 0")
    return 0


def cmd_lineage(args) -> int:
    from orchestration.lineage import diff_runs, lineage, print_diff, print_lineage

    data_dir = resolve_data_dir(args.data_dir)
    try:
        if args.diff:
            if len(args.target) != 2:
                print("vas lineage --diff needs two run ids", file=sys.stderr)
                return 2
            result, show = diff_runs(*args.target, data_dir), print_diff
        else:
            if len(args.target) != 1:
                print("vas lineage takes one path or run id (two with --diff)", file=sys.stderr)
                return 2
            result, show = lineage(args.target[0], data_dir), print_lineage
    except (ValueError, FileNotFoundError) as err:
        print(f"vas lineage: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        show(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vas", description="Value Augmented Sampling pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the whole asset graph")
    run.add_argument("--profile", default=None, help="params.yaml profile (default: $VAS_PROFILE or 'default')")
    run.add_argument("--data-dir", default=None, help="data folder (default: data/)")
    run.add_argument("--no-dvc-commit", dest="dvc_commit", action="store_false",
                     help="do not record the outputs in dvc.lock")
    run.add_argument("--force", action="store_true",
                     help="recompute every asset, even those whose inputs, params and code are unchanged")
    run.set_defaults(func=cmd_run)

    mat = sub.add_parser("materialize", help="materialize some assets (used by dvc.yaml stages)")
    mat.add_argument("assets", nargs="+", help="asset names, e.g. corpus base_model")
    mat.add_argument("--profile", default=None)
    mat.add_argument("--data-dir", default=None)
    mat.add_argument("--force", action="store_true", help="recompute even if nothing changed")
    mat.set_defaults(func=cmd_materialize)

    ing = sub.add_parser("ingest", help="validate preference files and retrain on the merged data "
                                         "(what the data/incoming sensor does, without the daemon)")
    ing.add_argument("files", nargs="+", help="CSV, JSONL or Parquet files with prompt, chosen, rejected[, attribute]")
    ing.add_argument("--profile", default=None)
    ing.add_argument("--data-dir", default=None)
    ing.set_defaults(func=cmd_ingest)

    stu = sub.add_parser("study", help="retrain rollouts, value models and evaluation per seed and aggregate "
                                       "the evaluation across seeds (data/study/)")
    stu.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    stu.add_argument("--profile", default=None)
    stu.add_argument("--data-dir", default=None, help="the main run's data folder (default: data/)")
    stu.add_argument("--force", action="store_true", help="recompute each seed even if nothing changed")
    stu.set_defaults(func=cmd_study)

    val = sub.add_parser("validate", help="validate a prompts or preference-pairs file")
    val.add_argument("file")
    val.add_argument("--kind", choices=["pairs", "prompts"], default=None, help="default: from the columns")
    val.add_argument("--quarantine", default=None, metavar="DIR", help="also write bad rows to DIR")
    val.add_argument("--profile", default=None, help="profile whose validation rules apply")
    val.set_defaults(func=cmd_validate)

    gen = sub.add_parser("generate", help="decode with VAS from the materialized base and value models")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    gen.add_argument("--weight", action="append", type=_weight, default=[], metavar="ATTR=W",
                     help="value model weight (beta) per reward attribute, e.g. positivity=2; repeatable")
    gen.add_argument("--n", type=int, default=4, help="completions per prompt")
    # Decode settings default to None: the decoder's own defaults apply (models.lm.sampling.SamplingConfig,
    # models.decoding.vas.VASConfig), so they are declared once.
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: SamplingConfig's)")
    gen.add_argument("--top-k", type=int, default=None,
                     help="base-model candidates steered per token (default: VASConfig's)")
    gen.add_argument("--min-p", type=float, default=None,
                     help="steer only candidates with pi0 >= MIN_P x the likeliest's; 0 steers all top-k "
                          "(default: VASConfig's)")
    gen.add_argument("--temperature", type=float, default=None, help="default: SamplingConfig's")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: SamplingConfig's")
    gen.add_argument("--data-dir", default=None, help="data folder (default: $VAS_DATA_DIR or data/)")
    gen.add_argument("--value-model", action="append", type=_assignment, default=[], metavar="ATTR=PATH",
                     help="use the value model saved at PATH for ATTR; repeatable")
    gen.add_argument("--device", default="auto", help="auto, cpu or cuda")
    gen.add_argument("--mean", action="store_true",
                     help="steer distributional value models by their mean (the paper's VAS), not the soft value")
    gen.add_argument("--calibrated", action="store_true",
                     help="steer by the mean normal score of each reward under pi0 (its quantile; value models "
                          "trained with calibrated bins): the strongest decoder at high KL")
    gen.add_argument("--json", action="store_true", help="print the completions as JSON")
    add_upstream_arguments(gen)
    gen.set_defaults(func=cmd_generate)
    srv = sub.add_parser("serve", help="OpenAI-compatible /v1/completions and /v1/models with per-request VAS weights")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--data-dir", default=None, help="data folder (default: $VAS_DATA_DIR or data/)")
    srv.add_argument("--device", default="auto", help="auto, cpu or cuda")
    srv.add_argument("--model-name", default="vas", help="the model id clients ask for (default: vas)")
    srv.add_argument("--max-batch-rows", type=int, default=None, metavar="N",
                     help="completions decoding at once in the running batch (default: sized for a 2-core CPU)")
    srv.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                     help="KV-cache tokens (prompt + max_tokens per completion) the running batch may reserve "
                          "(default: models/serving/scheduler.py MAX_KV_TOKENS)")
    srv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/* (default: "
                                                     "$VAS_API_KEY; unset: no auth)")
    srv.add_argument("--max-queued", type=int, default=ServeOptions.max_queued, metavar="N",
                     help="requests that may wait for the running batch; past it 429 with Retry-After "
                          "(default: %(default)s)")
    srv.add_argument("--request-timeout", type=float, default=ServeOptions.request_timeout, metavar="S",
                     help="seconds a request may take, then 408 (0: no limit; default: %(default)s)")
    srv.add_argument("--shutdown-timeout", type=float, default=ServeOptions.shutdown_timeout, metavar="S",
                     help="on SIGTERM, seconds the requests in flight get to finish (default: %(default)s)")
    add_upstream_arguments(srv)
    srv.set_defaults(func=cmd_serve)
    exp = sub.add_parser("export-gguf", help="write the base model as a GGUF file for llama.cpp (gpt2, f32)")
    exp.add_argument("--model-dir", default=None,
                     help="a saved Hugging Face GPT-2 folder (default: the base_model asset's model)")
    exp.add_argument("--out", default=None, help="the GGUF file to write (default: <data dir>/base_model.gguf)")
    exp.add_argument("--data-dir", default=None, help="data folder (default: $VAS_DATA_DIR or data/)")
    exp.set_defaults(func=cmd_export_gguf)
    lin = sub.add_parser("lineage", help="which data, params and code produced an artifact or run")
    lin.add_argument("target", nargs="+",
                     help="a path under data/ (e.g. data/value_models/positivity) or a Dagster run id; "
                          "two run ids with --diff")
    lin.add_argument("--diff", action="store_true", help="what changed between two runs: data, params, code, metrics")
    lin.add_argument("--data-dir", default=None, help="data folder (default: $VAS_DATA_DIR or data/)")
    lin.add_argument("--json", action="store_true", help="machine-readable output")
    lin.set_defaults(func=cmd_lineage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        decide_auto()      # now, while stderr is still the terminal: a Dagster step captures it
    except ValueError as err:
        print(f"vas: {err}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
