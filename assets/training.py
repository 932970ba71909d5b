"""Group `training`: one value model per reward attribute, fitted by TD(lambda) on the rollouts."""

from typing import Optional

import dagster as dg
from dagster_duckdb import DuckDBResource

from assets.common import LogToDagster, finish, lineage_inputs, output_path, reuse, torch_threads
from orchestration.profiles import config_from, resolve
from orchestration.resources import VasSettings

VERSIONS_DIR = "value_model_versions"  # under the data folder
# value_models params this asset reads itself; the rest configure ValueTrainConfig.
VALUE_MODELS_OWN_KEYS = ("extra_parameterizations", "extra_attributes", "backbone_init")


def value_model_name(attribute: str, parameterization: str, primary: str) -> str:
    """Folder of a value model under data/value_models: the attribute for the primary
    parameterization (what `vas generate` uses by default), attribute.param for the others."""
    return attribute if parameterization == primary else f"{attribute}.{parameterization}"


class ValueModelsConfig(dg.Config):
    train_steps: Optional[int] = None
    learning_rate: Optional[float] = None
    lam: Optional[float] = None
    parameterization: Optional[str] = None


@dg.asset(group_name="training", deps=["rollouts", "base_model", "reward_models"], kinds={"pytorch"}, pool="gpu",
          description="TD(lambda) value models of the frozen base policy, one per reward (scalar V(s·a) "
                      "and/or a Q head). CUDA with bf16 autocast when present; checkpoints and resumes.")
def value_models(context: dg.AssetExecutionContext, config: ValueModelsConfig, settings: VasSettings,
                 duckdb: DuckDBResource) -> dg.MaterializeResult:
    import json

    import pandas as pd

    from models.artifacts import atomic_path
    from models.lm import base_model_dir, pick_device, read_manifest
    from models.rollouts import training_rollouts
    from models.value_training import ValueTrainConfig, backbone_init_dir, clear_checkpoint, train_value_model

    torch_threads(settings)
    params = resolve(settings.params(), "value_models", config.model_dump())
    upstream = ["rollouts", "base_model", "reward_models"]
    inputs = lineage_inputs(settings, upstream)
    if (reused := reuse(context, settings, duckdb, "value_models", params, inputs)) is not None:
        keep_value_model_version(context, settings, inputs["rollouts"])
        return reused
    rollout_dir = output_path(settings, "rollouts")
    df = pd.read_parquet(rollout_dir / "rollouts.parquet")
    stats = json.loads((rollout_dir / "reward_stats.json").read_text())
    base_dir = output_path(settings, "base_model")
    model_dir = base_model_dir(base_dir)
    base_sha = read_manifest(base_dir)["weights_sha256"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = pick_device(settings.device)
    primary = params["parameterization"]
    parameterizations = [primary] + [p for p in params["extra_parameterizations"] if p != primary]
    metrics: dict[str, float] = {"device_cuda": float(device.type == "cuda")}
    series: dict[str, list[float]] = {}
    checkpoints = settings.path(".checkpoints", "value_models")
    rollouts_md5 = inputs["rollouts"]
    with LogToDagster(context), atomic_path(output_path(settings, "value_models")) as tmp:
        tmp.mkdir()
        for attribute in sorted(stats):
            data = training_rollouts(df, f"learned_{attribute}", tokenizer.eos_token_id, stats[attribute])
            for parameterization in parameterizations:
                extra_for = params["extra_attributes"]
                if parameterization != primary and extra_for and attribute not in extra_for:
                    continue
                name = value_model_name(attribute, parameterization, primary)
                train_config = config_from(ValueTrainConfig, params, "value_models", ignore=VALUE_MODELS_OWN_KEYS,
                                           parameterization=parameterization)
                init_dir = backbone_init_dir(params["backbone_init"], model_dir,
                                             output_path(settings, "reward_models") / attribute)
                model, result = train_value_model(data, init_dir, train_config, pad_id=tokenizer.pad_token_id,
                                                  device=str(device), checkpoint_dir=checkpoints / name,
                                                  progress=context.log.info)
                model.save(tmp / name)
                (tmp / name / "vas_value.json").write_text(json.dumps({
                    "attribute": attribute, "parameterization": parameterization,
                    "reward": f"learned_{attribute}", "reward_stats": stats[attribute],
                    "rollouts_md5": rollouts_md5, "base_weights_sha256": base_sha,
                    "train_config": train_config.__dict__ | {"prefix_lengths": list(train_config.prefix_lengths)},
                    "device": result["device"],
                }, indent=2, sort_keys=True, default=str))
                series[f"{name}/td_loss"] = result.pop("loss_curve")[::5]
                for key, value in result.items():
                    if isinstance(value, (int, float)):
                        metrics[f"{name}/{key}"] = value
                context.log.info(f"value model {name}: held-out corr(V(prefix), reward) "
                                 + ", ".join(f"{k.removeprefix('corr_prefix_')}: {v:.2f}" for k, v in result.items()
                                             if k.startswith("corr_prefix_")))
    # The models are saved: checkpoints only served a run that might have been killed.
    for name in list(checkpoints.glob("*")):
        clear_checkpoint(name)
    version = keep_value_model_version(context, settings, rollouts_md5)
    return finish(context, settings, duckdb, "value_models", params, metrics, inputs=inputs,
                  series=series, metadata={"version_path": dg.MetadataValue.path(str(version))})


def keep_value_model_version(context, settings, rollouts_md5: str):
    """Every value-model version the pipeline produced stays in data/value_model_versions/<md5>/
    (listed in versions.json with the run that made it); data/value_models is the current one."""
    from datetime import datetime, timezone

    from assets.common import code_version, git_sha
    from models.artifacts import keep_version

    record = {"run_id": context.run_id, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "rollouts_md5": rollouts_md5, "git_sha": git_sha(),
              "code_version": code_version()}
    version = keep_version(output_path(settings, "value_models"), settings.path(VERSIONS_DIR), record)
    context.log.info(f"value models version {version.name} kept in {version.parent}")
    return version
