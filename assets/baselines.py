"""Group `evaluation`: the DPO baseline, a fine-tuned copy of the base model (TRL DPOTrainer)."""

from typing import Optional

import dagster as dg
from dagster_duckdb import DuckDBResource

from assets.common import LogToDagster, finish, lineage_inputs, output_path, reuse, torch_threads
from orchestration.profiles import config_from, resolve
from orchestration.resources import VasSettings


class DPOModelConfig(dg.Config):
    train_steps: Optional[int] = None
    learning_rate: Optional[float] = None
    beta: Optional[float] = None


@dg.asset(group_name="evaluation", deps=["preference_pairs", "base_model"], kinds={"pytorch", "huggingface"},
          pool="gpu", description="The paper's baseline: a copy of the base model trained with TRL's DPO on the "
                                  "preference pairs of one attribute. The frozen base model is not touched.")
def dpo_model(context: dg.AssetExecutionContext, config: DPOModelConfig, settings: VasSettings,
              duckdb: DuckDBResource) -> dg.MaterializeResult:
    import pandas as pd

    from models.artifacts import atomic_path
    from models.dpo import DPOTrainConfig, train_dpo
    from models.lm import base_model_dir, pick_device, weights_sha256

    torch_threads(settings)
    params = resolve(settings.params(), "dpo", config.model_dump())
    upstream = ["preference_pairs", "base_model"]
    inputs = lineage_inputs(settings, upstream)
    if (reused := reuse(context, settings, duckdb, "dpo_model", params, inputs)) is not None:
        return reused
    pairs = pd.read_parquet(output_path(settings, "preference_pairs") / "pairs.parquet")
    device = str(pick_device(settings.device))
    with LogToDagster(context), atomic_path(output_path(settings, "dpo_model")) as tmp:
        result = train_dpo(pairs, base_model_dir(output_path(settings, "base_model")), tmp,
                           config_from(DPOTrainConfig, params, "dpo"), device=device, progress=context.log.info)
        sha = weights_sha256(tmp)
    curve = result.pop("loss_curve")
    return finish(context, settings, duckdb, "dpo_model", params, result, inputs=inputs,
                  series={"dpo_loss": curve}, model_version=sha)
