"""What every asset does when it finishes: hash its outputs, write DuckDB rows, build metadata."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable

import dagster as dg
import pandas as pd

from assets.metrics_db import copy_metrics, find_reusable, metric_row, write_rows
from models.artifacts import dvc_md5
from models.profiles import PROJECT_ROOT
from models.stages import code_version, output_of


def output_path(settings, asset: str) -> Path:
    """An asset's output under the settings' data folder (dvc.yaml lists the same path as the
    stage's out, so data version == the md5 in dvc.lock)."""
    return settings.path(output_of(asset))


def data_version_of(settings, asset: str) -> str:
    """The DVC md5 of an asset's output as it is on disk now."""
    path = output_path(settings, asset)
    if not path.exists():
        raise FileNotFoundError(f"asset {asset!r} has not been materialized for this data folder: missing {path}")
    return dvc_md5(path)


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """The commit the code ran at, with "-dirty" when the tracked code had local changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "models",
                                "assets", "orchestration", "params.yaml"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Run tag that turns re-use off: every selected asset is recomputed (`vas run --force`).
FORCE_TAG = "vas/force"


def lineage_inputs(settings, upstream: Iterable[str] = (), source: str | Iterable[str] | None = None
                   ) -> dict[str, str]:
    """What an asset reads: each upstream asset's md5 now on disk, and the md5 of each imported
    file or model folder (source: one path or several)."""
    inputs = {name: data_version_of(settings, name) for name in upstream}
    for path in ([source] if isinstance(source, str) else source or []):
        inputs[f"source:{path}"] = dvc_md5(path) if Path(path).exists() else "unhashed"
    return inputs


def reuse(context: dg.AssetExecutionContext, settings, duckdb, asset: str, params: dict,
          inputs: dict[str, str]) -> dg.MaterializeResult | None:
    """Re-use the output on disk when an earlier run made it from the same inputs (from
    lineage_inputs), params and code (the asset's code_version: its own sources, so an edit
    elsewhere leaves it re-usable); returns the MaterializeResult to return, or None when the
    asset must be computed (and `finish` then records the same inputs).

    A nightly retrain with nothing new is then a few hashes, and the data versions it reports
    are the ones already in dvc.lock. The run gets lineage and metric rows of its own (copied
    from the original run), so `vas lineage` and `--diff` see every asset of every run.
    """
    if context.run.tags.get(FORCE_TAG, "").lower() in ("1", "true", "yes"):
        return None
    path = output_path(settings, asset)
    if not path.exists():
        return None
    output_md5 = dvc_md5(path)
    sha = git_sha()
    with duckdb.get_connection() as conn:
        original = find_reusable(conn, asset=asset, inputs=inputs, params=params, code_version=code_version(asset),
                                 output_md5=output_md5)
        if original is None or original == context.run_id:
            return None
        metrics = copy_metrics(conn, from_run=original, to_run=context.run_id, asset=asset)
        write_rows(conn, run_id=context.run_id, asset=asset, metrics=[], params=params, data_version=output_md5,
                   model_version=None, git_sha=sha, keep_metrics=True,
                   lineage={"inputs": inputs, "output_md5": output_md5, "code_version": code_version(asset),
                            "reused_from": original})
    context.log.info(f"{asset}: inputs, params and code unchanged since run {original}; "
                     f"re-using its output (md5 {output_md5}). Tag the run {FORCE_TAG}=true to recompute.")
    meta: dict[str, Any] = {m["metric"]: _metadata_value(m["value"]) for m in metrics}
    meta.update(_lineage_metadata(settings, asset, params, inputs, output_md5, sha))
    meta["reused_from_run"] = original
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(output_md5))


def torch_threads(settings) -> None:
    """A fixed intra-op thread count (params.yaml's top-level `threads` for the settings' profile)
    and deterministic kernels, so the same seed, data and code give the same numbers when re-run:
    CPU reductions are split by thread count, so a count that followed the machine's cores would
    change the floats from one machine to the next."""

    # torch loads here and in the assets that use it: `dagster dev` loads these definitions without torch
    import torch

    torch.set_num_threads(max(1, int(settings.params()["threads"])))
    # cuBLAS is deterministic only with a fixed workspace; read when CUDA initializes.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


class DagsterLogHandler(logging.Handler):
    """Forwards models/ logging to the Dagster run log, so long work shows progress in the UI."""

    def __init__(self, context: dg.AssetExecutionContext):
        super().__init__(logging.INFO)
        self.context = context

    def emit(self, record: logging.LogRecord) -> None:
        self.context.log.info(record.getMessage())


class LogToDagster:
    """Route models/ log records to the run log for the duration of an asset."""

    def __init__(self, context):
        self.handler = DagsterLogHandler(context)
        self.logger = logging.getLogger("models")

    def __enter__(self):
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


def _metadata_value(value: Any):
    if isinstance(value, bool):
        return dg.MetadataValue.bool(value)
    if isinstance(value, int):
        return dg.MetadataValue.int(value)
    if isinstance(value, float):
        return dg.MetadataValue.float(value)
    if isinstance(value, (dict, list)):
        return dg.MetadataValue.json(value)
    return dg.MetadataValue.text(str(value))


def _lineage_metadata(settings, asset: str, params: dict, inputs: dict, md5: str, sha: str) -> dict[str, Any]:
    return {
        "dvc_md5": md5,
        "profile": settings.profile,
        "params": dg.MetadataValue.json(params),
        "inputs": dg.MetadataValue.json(inputs),
        "git_sha": sha,
        "code_version": code_version(asset),
        "output": dg.MetadataValue.path(str(output_path(settings, asset))),
    }


def finish(
    context: dg.AssetExecutionContext,
    settings,
    duckdb,
    asset: str,
    params: dict,
    metrics: dict[str, float],
    inputs: dict[str, str] | None = None,
    series: dict[str, list[float]] | None = None,
    metadata: dict[str, Any] | None = None,
    model_version: str | None = None,
    extra_rows: list[dict] | None = None,
) -> dg.MaterializeResult:
    """Hash outputs, record metrics and lineage in DuckDB, and return the MaterializeResult.

    `inputs` is what the asset read, from lineage_inputs (taken before the work, as `reuse`
    compared it): upstream outputs' md5s and any imported file or model folder's.
    """
    data_version = data_version_of(settings, asset)
    inputs = inputs or {}
    rows = [metric_row(name, value) for name, value in metrics.items()]
    for name, values in (series or {}).items():
        rows += [metric_row(name, v, step=i) for i, v in enumerate(values)]
    rows += extra_rows or []
    sha = git_sha()
    with duckdb.get_connection() as conn:
        write_rows(conn, run_id=context.run_id, asset=asset, metrics=rows, params=params,
                   data_version=data_version, model_version=model_version, git_sha=sha,
                   lineage={"inputs": inputs, "output_md5": data_version,
                            "code_version": code_version(asset)})
    meta: dict[str, Any] = {name: _metadata_value(value) for name, value in metrics.items()}
    meta.update(_lineage_metadata(settings, asset, params, inputs, data_version, sha))
    for key, value in (metadata or {}).items():
        meta[key] = value if isinstance(value, dg.MetadataValue) else _metadata_value(value)
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(data_version))


def record_check(context, settings, duckdb, check: str, asset: str, passed: bool,
                 counts: dict[str, float]) -> None:
    """Check outcomes go to the metrics table too, under the asset they guard."""
    rows = [metric_row(f"check.{check}.passed", 1.0 if passed else 0.0)]
    rows += [metric_row(f"check.{check}.{k}", v) for k, v in counts.items()]
    with duckdb.get_connection() as conn:
        write_rows(conn, run_id=context.run.run_id, asset=f"{asset}:{check}", metrics=rows, params={},
                   data_version=None, model_version=None, git_sha=git_sha())



def load_held_out(run):
    """(device, frozen base, tokenizer, held-out prompts, learned reward scorers): what every asset
    that measures decoders or value models on the eval prompts reads first."""

    from models.lm.lm import load_frozen_base, pick_device
    from models.rewards.reward_model import load_reward_models

    device = str(pick_device(run.settings.device))
    base, tokenizer, _ = load_frozen_base(run.path("base_model"), device=device)
    prompts = pd.read_parquet(run.path("prompts") / "prompts.parquet")
    prompts = prompts[prompts.split == "eval"].reset_index(drop=True)
    scorers = load_reward_models(run.path("reward_models"), device=device)
    return device, base, tokenizer, prompts, scorers
