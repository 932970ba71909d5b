"""Group `rollouts`: K completions per training prompt from the frozen base model, scored by every reward.

`rollout_shards` samples the training prompts as a Dagster asset with static partitions, one per
shard (params.yaml rollouts.shards, read when the code location loads): an executor can run the
shards on separate workers, a run can take one shard (its partition) or all of them in one step
(a partition-key range: BackfillPolicy.single_run), and a run without a partition (a job started
without partition tags) samples them all. Each shard is written to data/rollout_shards/<shard>/
with a manifest of what produced it, and gets its own lineage row (`rollout_shards/<shard>`) and
re-use. `rollouts` merges every shard in train-split order, scores the rows with every reward, and
writes data/rollouts/ as downstream reads it; its lineage inputs carry each shard's md5.
"""

import json
from typing import Any, Optional

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from assets.common import (
    FORCE_TAG,
    LogToDagster,
    git_sha,
    lineage_inputs,
    output_path,
    record_check,
    torch_threads,
)
from assets.k8s import GPU_OP_TAGS
from assets.metrics_db import find_reusable, metric_row, write_rows
from assets.resources import VasSettings
from assets.stage import Produced, StageRun, pipeline_asset
from models.artifacts import dvc_md5, write_folder
from models.data.validation import validate_rollouts
from models.profiles import load_profile, resolve
from models.rewards.rewards import GOLD_REWARDS
from models.stages import STAGES, code_version

SHARD_KEYS = [str(k) for k in range(int(load_profile()["rollouts"]["shards"]))]
ROLLOUT_SHARDS = dg.StaticPartitionsDefinition(SHARD_KEYS)
SHARD_MANIFEST = "shard.json"


def all_shards_tags() -> dict[str, str]:
    """Run tags that make one run materialize every shard of rollout_shards in one step (a
    partition-key range), beside the unpartitioned assets of the same run."""
    return {"dagster/asset_partition_range_start": SHARD_KEYS[0],
            "dagster/asset_partition_range_end": SHARD_KEYS[-1]}


class RolloutsConfig(dg.Config):
    """Launchpad overrides of params.yaml's rollouts section; give rollout_shards and rollouts the same."""

    samples_per_prompt: Optional[int] = None
    max_new_tokens: Optional[int] = None


def _resolved(settings: VasSettings, config: RolloutsConfig | None) -> dict:
    params = resolve(settings.params(), "rollouts", config.model_dump() if config is not None else None)
    if int(params["shards"]) != len(SHARD_KEYS):
        raise ValueError(f"rollouts.shards is {params['shards']} for profile {settings.profile!r}, but the code "
                         f"location loaded {len(SHARD_KEYS)} shard partitions (its VAS_PROFILE's): start it "
                         f"with VAS_PROFILE={settings.profile}")
    return params


def _step_shards(context) -> list[str]:
    """The shards this step materializes: its partition (range), or every shard in a run without one."""
    if context.has_partition_key_range:
        return list(context.partition_keys)
    if context.has_partition_key:
        return [context.partition_key]
    return list(SHARD_KEYS)


def _shard_metrics(df: pd.DataFrame) -> dict[str, float]:
    return {"n_rollouts": len(df), "n_prompts": int(df.prompt_id.nunique()),
            "mean_tokens": float(df.n_tokens.mean()) if len(df) else 0.0}


@dg.asset(name="rollout_shards", deps=STAGES["rollout_shards"].upstream, code_version=code_version("rollout_shards"),
          partitions_def=ROLLOUT_SHARDS, backfill_policy=dg.BackfillPolicy.single_run(), group_name="rollouts",
          kinds={"pytorch", "parquet"}, pool="gpu", op_tags=GPU_OP_TAGS,
          description="Frozen pi0 samples of one prompt shard (a partition): token ids and pi0 log-probs; "
                      "the same rows whatever the number of shards or the order they run in.")
def rollout_shards(context: dg.AssetExecutionContext, config: RolloutsConfig, settings: VasSettings,
                   duckdb: DuckDBResource) -> dg.MaterializeResult:
    torch_threads(settings)
    params = _resolved(settings, config)
    inputs = lineage_inputs(settings, STAGES["rollout_shards"].upstream)
    version, sha, root = code_version("rollout_shards"), git_sha(), output_path(settings, "rollout_shards")
    force = context.run.tags.get(FORCE_TAG, "").lower() in ("1", "true", "yes")
    loaded: dict[str, Any] = {}
    shard_md5s: dict[str, str] = {}
    reused: dict[str, str] = {}
    for shard in _step_shards(context):
        asset, folder = f"rollout_shards/{shard}", root / shard
        shard_params = {**params, "shard": int(shard)}
        if not force and folder.exists():
            md5 = dvc_md5(folder)
            with duckdb.get_connection() as conn:
                original = find_reusable(conn, asset=asset, inputs=inputs, params=shard_params, code_version=version,
                                         output_md5=md5)
                if original is not None and original != context.run_id:
                    write_rows(conn, run_id=context.run_id, asset=asset, metrics=[], params=shard_params,
                               data_version=md5, model_version=None, git_sha=sha, keep_metrics=True,
                               lineage={"inputs": inputs, "output_md5": md5, "code_version": version,
                                        "reused_from": original})
                    context.log.info(f"shard {shard}: unchanged since run {original}; re-using it (md5 {md5})")
                    shard_md5s[shard], reused[shard] = md5, original
                    continue
        with LogToDagster(context):
            df = _sample_shard(settings, params, int(shard), loaded, context.log.info)
        write_folder(folder, {"rollouts.parquet": df, SHARD_MANIFEST: {
            "shard": int(shard), "n_shards": len(SHARD_KEYS), "params": params, "inputs": inputs,
            "code_version": version, "prompt_positions": sorted(set(df.prompt_pos.tolist()))}})
        shard_md5s[shard] = dvc_md5(folder)
        with duckdb.get_connection() as conn:
            write_rows(conn, run_id=context.run_id, asset=asset,
                       metrics=[metric_row(k, v) for k, v in _shard_metrics(df).items()], params=shard_params,
                       data_version=shard_md5s[shard], model_version=None, git_sha=sha,
                       lineage={"inputs": inputs, "output_md5": shard_md5s[shard], "code_version": version})
    md5 = dvc_md5(root)
    with duckdb.get_connection() as conn:   # the DVC output: every shard folder on disk
        write_rows(conn, run_id=context.run_id, asset="rollout_shards", metrics=[], params=params, data_version=md5,
                   model_version=None, git_sha=sha,
                   lineage={"inputs": inputs, "output_md5": md5, "code_version": version})
    return dg.MaterializeResult(data_version=dg.DataVersion(md5), metadata={
        "dvc_md5": md5, "shard_md5s": dg.MetadataValue.json(shard_md5s), "reused_shards": dg.MetadataValue.json(reused),
        "n_shards": len(SHARD_KEYS), "profile": settings.profile, "params": dg.MetadataValue.json(params),
        "inputs": dg.MetadataValue.json(inputs), "git_sha": sha, "code_version": version,
        "output": dg.MetadataValue.path(str(root))})


def _sample_shard(settings: VasSettings, params: dict, shard: int, loaded: dict, progress) -> pd.DataFrame:
    """One shard's rows (models.data.rollouts.sample_rollouts on shard_prompts), the base model loaded once per step."""
    # torch-backed modules load inside the assets that use them: `dagster dev` loads these definitions without torch
    from models.data.rollouts import RolloutConfig, sample_rollouts, shard_prompts
    from models.lm.lm import load_frozen_base, pick_device
    from models.profiles import config_from

    if not loaded:
        loaded["device"] = device = str(pick_device(settings.device))
        loaded["model"], loaded["tokenizer"], _ = load_frozen_base(output_path(settings, "base_model"), device=device)
        prompts = pd.read_parquet(output_path(settings, "prompts") / "prompts.parquet")
        loaded["train"] = prompts[prompts.split == "train"].reset_index(drop=True)
    config = config_from(RolloutConfig, params, "rollouts", ignore=("shards",))
    train = loaded["train"]
    positions = shard_prompts(len(train), config, len(SHARD_KEYS), shard)
    return sample_rollouts(loaded["model"], loaded["tokenizer"], train.iloc[positions], config,
                           device=loaded["device"], progress=progress, positions=positions)


def _shard_inputs(settings: VasSettings, params: dict) -> dict[str, str]:
    """Each shard's md5, in the merge's lineage inputs and re-use key."""
    root = output_path(settings, "rollout_shards")
    return {f"rollout_shards/{k}": dvc_md5(root / k) if (root / k).exists() else "missing" for k in SHARD_KEYS}


@pipeline_asset("rollouts", RolloutsConfig, more_inputs=_shard_inputs, group_name="rollouts",
                kinds={"pytorch", "parquet"}, pool="gpu", op_tags=GPU_OP_TAGS,
                description="Frozen pi0 samples for value training (every shard of rollout_shards, in "
                            "train-split order): token ids, pi0 log-probs, learned and gold reward scores.")
def rollouts(run: StageRun) -> Produced:
    from models.data.rollouts import merge_shards, reward_stats, score_rollouts
    from models.lm.lm import pick_device
    from models.rewards.reward_model import load_reward_models

    params = _resolved(run.settings, run.config)
    root = run.path("rollout_shards")
    wanted = {"n_shards": len(SHARD_KEYS), "params": params, "code_version": code_version("rollout_shards"),
              "inputs": {name: run.inputs[name] for name in STAGES["rollout_shards"].upstream}}
    frames, stale = [], []
    for shard in SHARD_KEYS:
        manifest_file = root / shard / SHARD_MANIFEST
        if not manifest_file.exists():
            stale.append(f"shard {shard}: not materialized")
            continue
        manifest = json.loads(manifest_file.read_text())
        differs = [key for key, value in wanted.items() if manifest.get(key) != value]
        if differs:
            stale.append(f"shard {shard}: its {', '.join(differs)} differ from this run's")
        frames.append(pd.read_parquet(root / shard / "rollouts.parquet"))
    if stale:
        raise ValueError("rollouts merges the shards of rollout_shards, but " + "; ".join(stale)
                         + ": materialize rollout_shards (every partition) with the same profile and config first")
    prompts = pd.read_parquet(run.path("prompts") / "prompts.parquet")
    n_train = int((prompts.split == "train").sum())
    df = merge_shards(frames, n_train, int(params["samples_per_prompt"]))
    device = str(pick_device(run.settings.device))
    scorers = load_reward_models(run.path("reward_models"), device=device)
    df = score_rollouts(df, scorers, [a for a in scorers if a in GOLD_REWARDS])
    stats = {a: reward_stats(df, f"learned_{a}") for a in scorers}
    write_folder(run.path("rollouts"), {"rollouts.parquet": df, "reward_stats.json": stats, "params.json": params})
    metrics = {
        "n_rollouts": len(df),
        "n_prompts": int(df.prompt_id.nunique()),
        "n_shards": len(SHARD_KEYS),
        "mean_tokens": float(df.n_tokens.mean()),
        "finished_fraction": float(df.finished.mean()),
    }
    for column in df.columns:
        if column.startswith(("learned_", "gold_")):
            metrics[f"{column}_mean"] = float(df[column].mean())
            metrics[f"{column}_std"] = float(df[column].std())
    shard_md5s = {k.split("/", 1)[1]: v for k, v in run.inputs.items() if k.startswith("rollout_shards/")}
    return Produced(metrics, metadata={"shard_md5s": dg.MetadataValue.json(shard_md5s)}, params=params)


@dg.asset_check(asset="rollouts", blocking=True,
                description="GX: no empty completions, finite scores, counts as configured.")
def rollouts_suite(context: dg.AssetCheckExecutionContext, settings: VasSettings,
                   duckdb: DuckDBResource) -> dg.AssetCheckResult:
    folder = output_path(settings, "rollouts")
    # The parameters this materialization resolved (a launchpad override included), not the profile's.
    params = json.loads((folder / "params.json").read_text())
    df = pd.read_parquet(folder / "rollouts.parquet")
    prompts = pd.read_parquet(output_path(settings, "prompts") / "prompts.parquet")
    n_train = int((prompts.split == "train").sum())
    report = validate_rollouts(df, str(output_path(settings, "rollouts") / "rollouts.parquet"),
                               expected_rows=n_train * int(params["samples_per_prompt"]))
    counts = {"n_rows": len(df), "n_problems": len(report.problems),
              "n_failed_expectations": len(report.failed_expectations)}
    record_check(context, settings, duckdb, "rollouts_suite", "rollouts", report.success, counts)
    metadata = {**{k: dg.MetadataValue.int(v) for k, v in counts.items()},
                "failed_expectations": dg.MetadataValue.json(report.failed_expectations)}
    if report.problems:
        metadata["problems"] = dg.MetadataValue.md("\n".join(f"- {p}" for p in report.problems[:50]))
    return dg.AssetCheckResult(passed=report.success, metadata=metadata)
