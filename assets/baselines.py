"""Group `evaluation`: the DPO baseline, a fine-tuned copy of the base model (TRL DPOTrainer)."""

import json
from typing import Optional

import dagster as dg
import pandas as pd

from assets.stage import Produced, StageRun, pipeline_asset
from models.artifacts import atomic_path

# In the dpo_model folder instead of a model when dpo.skip gives a reason (the real profile on CPU).
DPO_SKIPPED = "SKIPPED.json"


class DPOModelConfig(dg.Config):
    train_steps: Optional[int] = None
    learning_rate: Optional[float] = None
    beta: Optional[float] = None


@pipeline_asset("dpo_model", DPOModelConfig, group_name="evaluation", kinds={"pytorch", "huggingface"}, pool="gpu",
                description="The paper's baseline: a copy of the base model trained with TRL's DPO on the "
                            "preference pairs of one attribute. The frozen base model is not touched.")
def dpo_model(run: StageRun) -> Produced:
    # torch-backed modules load inside the assets that use them: `dagster dev` loads these definitions without torch
    from models.evaluation.dpo import DPOTrainConfig, train_dpo
    from models.lm.lm import base_model_dir, pick_device, weights_sha256

    if run.params["skip"]:
        # Said in the folder and the report, not silently missing: evaluation then has no DPO row.
        with atomic_path(run.path("dpo_model")) as tmp:
            tmp.mkdir()
            (tmp / DPO_SKIPPED).write_text(json.dumps({"reason": run.params["skip"]}, indent=2) + "\n")
        run.log.info(f"DPO baseline skipped: {run.params['skip']}")
        return Produced({"skipped": 1.0}, metadata={"skipped": run.params["skip"]})
    pairs = pd.read_parquet(run.path("preference_pairs") / "pairs.parquet")
    device = str(pick_device(run.settings.device))
    with atomic_path(run.path("dpo_model")) as tmp:
        result = train_dpo(pairs, base_model_dir(run.path("base_model")), tmp,
                           run.config_for(DPOTrainConfig, ignore=("skip",)), device=device, progress=run.log.info)
        sha = weights_sha256(tmp)
    curve = result.pop("loss_curve")
    return Produced(result, series={"dpo_loss": curve}, model_version=sha)
