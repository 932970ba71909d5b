"""Group `rewards`: one Bradley-Terry reward model per attribute, learned from preference_pairs only."""

import shutil
from typing import Optional

import dagster as dg
import numpy as np
import pandas as pd

from assets.stage import Produced, StageRun, pipeline_asset
from models.artifacts import atomic_path, write_json
from models.rewards.rewards import GOLD_REWARDS

# Beside the reward models' folders: each one's held-out accuracy, the gold's ceiling and its pairs
# by origin (what the report says the learned rewards are worth).
HELDOUT_FILE = "heldout.json"


class RewardModelsConfig(dg.Config):
    train_steps: Optional[int] = None
    learning_rate: Optional[float] = None
    # attribute -> local HF sequence-classifier folder to use instead of training one.
    sources: Optional[dict[str, str]] = None


def _classifiers(settings, params) -> list[str]:
    """A user's classifier is known by its folder's contents, not its path (re-use must see a swap)."""
    return sorted((params.get("sources") or {}).values())


def _completion_pairs(eval_pairs: pd.DataFrame, margins: list[float], metrics: dict,
                      attribute: str) -> tuple[pd.DataFrame, dict]:
    """With pairs of human continuations among the training pairs, `heldout_accuracy` stays the
    accuracy on held-out pairs of the base model's completions, what the reward must rank when it
    scores rollouts and Best-of-N candidates (and what the gold ceiling is taken on); the human
    pairs' own held-out accuracy goes beside it. Returns those completion pairs and the training
    metrics they replace."""
    from models.data.preferences import HUMAN_SNIPPETS
    from models.rewards.reward_model import pair_accuracy

    human = (eval_pairs.origin == HUMAN_SNIPPETS).to_numpy() if "origin" in eval_pairs else None
    if human is None or not human.any():
        return eval_pairs, {}
    margins = np.asarray(margins)
    metrics[f"{attribute}/heldout_accuracy_human_snippets"] = pair_accuracy(margins[human], np.zeros(human.sum()))
    sampled = margins[~human]
    accuracy = pair_accuracy(sampled, np.zeros(len(sampled))) if len(sampled) else float("nan")
    return eval_pairs[~human], {"heldout_accuracy": accuracy, "n_eval_pairs": len(sampled)}


@pipeline_asset("reward_models", RewardModelsConfig, sources=_classifiers, group_name="rewards",
                kinds={"pytorch", "huggingface"}, pool="gpu",
                description="Bradley-Terry reward models (one per attribute) learned from the pairs; "
                            "held-out accuracy beside the gold reward's own ceiling on the same noisy labels.")
def reward_models(run: StageRun) -> Produced:
    # torch-backed modules load inside the assets that use them: `dagster dev` loads these definitions without torch
    from models.data.preferences import SAMPLED
    from models.lm.lm import pick_device
    from models.rewards.reward_model import (
        RewardTrainConfig,
        gold_ceiling_accuracy,
        load_reward_model,
        pair_accuracy,
        save_reward_model,
        train_reward_model,
    )

    params = run.params
    pairs = pd.read_parquet(run.path("preference_pairs") / "pairs.parquet")
    device = str(pick_device(run.settings.device))
    metrics: dict[str, float] = {}
    series: dict[str, list[float]] = {}
    summary: dict[str, dict] = {}
    with atomic_path(run.path("reward_models")) as tmp:
        tmp.mkdir()
        for attribute, group in pairs.groupby("attribute", sort=True):
            group = group.reset_index(drop=True)
            source = (params.get("sources") or {}).get(attribute)
            if source:
                run.log.info(f"reward model {attribute}: using sequence classifier {source}")
                shutil.copytree(source, tmp / attribute)
                scorer = load_reward_model(tmp / attribute, device=device)
                acc = pair_accuracy(scorer(group.prompt.tolist(), group.chosen.tolist()),
                                    scorer(group.prompt.tolist(), group.rejected.tolist()))
                metrics[f"{attribute}/heldout_accuracy"] = acc
                eval_pairs = group
            else:
                run.log.info(f"reward model {attribute}: training on {len(group)} pairs")
                model, tokenizer, train = train_reward_model(
                    group, run.path("base_model"),
                    run.config_for(RewardTrainConfig, ignore=("sources",)), device=device,
                    progress=run.log.info)
                save_reward_model(model, tokenizer, tmp / attribute)
                eval_pairs, replaced = _completion_pairs(group.loc[train["eval_index"]], train["eval_margins"],
                                                         metrics, attribute)
                train.update(replaced)
                series[f"{attribute}/train_loss"] = train["loss_curve"][::5]
                for key in ("heldout_accuracy", "heldout_loss", "train_loss", "n_train_pairs", "n_eval_pairs",
                            "train_seconds"):
                    metrics[f"{attribute}/{key}"] = train[key]
            if attribute in GOLD_REWARDS:
                # The ceiling: how often the gold reward itself agrees with the noisy labels.
                metrics[f"{attribute}/gold_ceiling_accuracy"] = gold_ceiling_accuracy(eval_pairs, attribute)
            run.log.info(f"reward model {attribute}: held-out accuracy "
                             f"{metrics[f'{attribute}/heldout_accuracy']:.3f} (gold ceiling "
                             f"{metrics.get(f'{attribute}/gold_ceiling_accuracy', float('nan')):.3f})")
            summary[attribute] = {
                **{key: metrics[f"{attribute}/{key}"] for key in ("heldout_accuracy", "gold_ceiling_accuracy")
                   if f"{attribute}/{key}" in metrics},
                "pairs_by_origin": {str(k): int(n) for k, n in group.origin.value_counts().items()}
                if "origin" in group else {SAMPLED: len(group)},
            }
        write_json(summary, tmp / HELDOUT_FILE)
    return Produced(metrics, series=series)
