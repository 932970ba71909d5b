"""Group `training`: the small value backbone, and one value model per reward attribute, fitted by
TD(lambda) on the rollouts."""

import dataclasses
import json
from datetime import datetime, timezone
from typing import Optional

import dagster as dg
import pandas as pd

from assets.common import git_sha, output_path
from assets.k8s import GPU_OP_TAGS
from assets.stage import Produced, StageRun, pipeline_asset
from models.artifacts import atomic_path, keep_version
from models.stages import STAGES, code_version
from models.value.value_store import DISTILLED, META_FILE, VALUE_MODELS_OWN_KEYS, default_parameterization, value_model_name

HEAD_INITS = ("zero", "reward_model")


def reward_model_start(reward_dir, stats: dict, vocab_size: int):
    """value_models.head_init reward_model: a scalar value model that starts as the reward model in
    reward_dir read at every prefix (models.decoding.reward_guidance.reward_value_start), recording where
    its weights came from."""
    from models.decoding.reward_guidance import reward_value_start
    from models.lm.lm import weights_sha256
    from models.rewards.reward_model import load_reward_model

    value = reward_value_start(load_reward_model(reward_dir), stats, vocab_size)
    value.init_info = {"init_from": str(reward_dir), "init_weights_sha256": weights_sha256(reward_dir)}
    return value


class ValueBackboneConfig(dg.Config):
    base_layers: Optional[int] = None
    n_layer: Optional[int] = None
    n_embd: Optional[int] = None
    train_steps: Optional[int] = None


# A small LM like the base model, trained as base_model is: the GPU pool, no GPU request of its own on k8s.
@pipeline_asset("value_backbone", ValueBackboneConfig, group_name="training", kinds={"pytorch", "huggingface"},
                pool="gpu",
                upstream=lambda settings, params: ["base_model"] if params["base_layers"] else ["corpus", "base_model"],
                description="What value models start from (value_models.backbone_init): a GPT-2 like the base "
                            "model but smaller, trained on the corpus with the base tokenizer, or the base "
                            "model's first layers (base_layers).")
def value_backbone(run: StageRun) -> Produced:
    # torch-backed modules load inside the assets that use them: `dagster dev` loads these definitions without torch
    from models.lm.lm import (
        TinyLMConfig,
        base_model_dir,
        load_frozen_base,
        load_tokenizer,
        save_pretrained,
        train_tiny_lm,
        truncated_copy,
        weights_sha256,
    )

    if run.params["base_layers"]:
        base, tokenizer, _ = load_frozen_base(run.path("base_model"))
        with atomic_path(run.path("value_backbone")) as tmp:
            save_pretrained(truncated_copy(base, run.params["base_layers"]), tokenizer, tmp)
            sha = weights_sha256(tmp)
        n_params = sum(p.numel() for p in base.base_model.parameters())
        run.log.info(f"value backbone: the base model's first {run.params['base_layers']} layers, "
                     f"weights sha256 {sha[:12]}")
        return Produced({"base_layers": run.params["base_layers"], "base_body_params": n_params},
                        model_version=sha, metadata={"weights_sha256": sha})
    tokenizer = load_tokenizer(base_model_dir(run.path("base_model")))
    texts = pd.read_parquet(run.path("corpus")).text.tolist()
    config = run.config_for(TinyLMConfig, vocab_size=len(tokenizer), ignore=("base_layers",))
    with atomic_path(run.path("value_backbone")) as tmp:
        model, tokenizer, train = train_tiny_lm(texts, config, device=run.settings.device, progress=run.log.info,
                                                tokenizer=tokenizer, name="value backbone")
        save_pretrained(model, tokenizer, tmp)
        sha = weights_sha256(tmp)
    run.log.info(f"value backbone: {train['n_params'] / 1e6:.2f}M parameters, weights sha256 {sha[:12]}")
    series = {"train_loss": train.pop("loss_curve")[::10]}
    metrics = {k: v for k, v in train.items() if isinstance(v, (int, float))}
    return Produced(metrics, series=series, model_version=sha, metadata={"weights_sha256": sha})


class ValueModelsConfig(dg.Config):
    train_steps: Optional[int] = None
    learning_rate: Optional[float] = None
    lam: Optional[float] = None
    parameterization: Optional[str] = None
    backbone: Optional[str] = None        # a value backbone of its own: a local HF causal LM (params.yaml)


def keep_value_model_version(run: StageRun):
    """Every value-model version the pipeline produced stays in data/value_model_versions/<md5>/
    (listed in versions.json with the run that made it); data/value_models is the current one."""
    record = {"run_id": run.context.run_id, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "rollouts_md5": run.inputs["rollouts"], "git_sha": git_sha(),
              "code_version": code_version("value_models")}
    version = keep_version(run.path("value_models"), run.settings.path(STAGES["value_models"].versions), record)
    run.log.info(f"value models version {version.name} kept in {version.parent}")
    return version


def _backbone(settings, params) -> str | None:
    """A value backbone of its own (value_models.backbone) is known by its folder's contents, like a
    user's reward model: re-use must see a swap, and the lineage shows its md5."""
    if not params["backbone"]:
        return None
    from models.lm.lm import base_model_dir
    from models.value.value_training import backbone_init_dir

    base_dir = base_model_dir(output_path(settings, "base_model"))
    return str(backbone_init_dir(params["backbone_init"], base_dir, None, params["backbone"]))


def human_rows(run: StageRun, tokenizer, df: pd.DataFrame, stats: dict) -> pd.DataFrame | None:
    """value_models.extra_human_continuations: that many human continuations (every one when -1;
    None when 0) of the snippets no eval prompt was cut from, in the rollouts' columns and token
    budget, scored by every reward model: more distinct prompts for the extra value models, which
    fit every prefix (models/data/human_continuations.py)."""
    n = run.params["extra_human_continuations"]
    if not n:
        return None
    from assets.synthesis import HUMAN_SNIPPETS
    from models.data.human_continuations import scored_human_continuations
    from models.rewards.reward_model import load_reward_models

    source = run.path("prompts") / HUMAN_SNIPPETS
    if not source.is_file():
        raise FileNotFoundError(f"value_models.extra_human_continuations is {n}, but {source} is missing: it is "
                                f"written by a prompts asset that cuts human-rated snippets (prompts.snippets)")
    scorers = load_reward_models(run.path("reward_models"))
    rows = scored_human_continuations(pd.read_parquet(source), tokenizer, run.params["rollouts"]["max_new_tokens"],
                                      {a: scorers[a] for a in run.params["extra_attributes"] or stats},
                                      n=None if n < 0 else n, seed=run.params["seed"])
    run.log.info(f"{len(rows)} human continuations beside {len(df)} rollouts for the extra value models")
    return rows[[c for c in df.columns if c in rows.columns]]


@pipeline_asset("value_models", ValueModelsConfig, sources=_backbone, on_reuse=keep_value_model_version,
                group_name="training",
                kinds={"pytorch"}, pool="gpu", op_tags=GPU_OP_TAGS,
                description="TD(lambda) value models of the frozen base policy, one per reward (scalar V(s·a) "
                            "and/or a Q head). CUDA with bf16 autocast when present; checkpoints and resumes.")
def value_models(run: StageRun) -> Produced:
    # torch, transformers and torch-backed modules load inside the assets that use them: `dagster dev`
    # loads these definitions without torch
    from models.data.rollouts import training_rollouts
    from models.lm.lm import base_model_dir, load_frozen_base, pick_device, read_manifest
    from models.profiles import config_from
    from models.value.checkpoints import clear_checkpoint
    from models.value.distill import DistillConfig, distill_head
    from models.value.value_training import ValueTrainConfig, backbone_init_dir, train_value_model

    params = run.params
    rollout_dir = run.path("rollouts")
    df = pd.read_parquet(rollout_dir / "rollouts.parquet")
    stats = json.loads((rollout_dir / "reward_stats.json").read_text())
    base_dir = run.path("base_model")
    model_dir = base_model_dir(base_dir)
    base_sha = read_manifest(base_dir)["weights_sha256"]
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = pick_device(run.settings.device)
    primary = params["parameterization"]
    parameterizations = [primary] + [p for p in params["extra_parameterizations"] if p != primary]
    known = {f.name for f in dataclasses.fields(ValueTrainConfig)} - {"parameterization", "seed"}
    if unknown := sorted(set(params["extra_config"]) - known):
        raise KeyError(f"unknown parameter(s) {', '.join('value_models.extra_config.' + k for k in unknown)}; "
                       f"known: {', '.join(sorted(known))}")
    if params["head_init"] not in HEAD_INITS:
        raise ValueError(f"value_models.head_init must be one of {', '.join(map(repr, HEAD_INITS))}, "
                         f"got {params['head_init']!r}")
    if params["head_init"] == "reward_model" and "scalar" not in parameterizations:
        raise ValueError("value_models.head_init 'reward_model' starts scalar value models as the reward model; "
                         f"none is trained here (parameterization {primary!r}, extra {params['extra_parameterizations']})")
    metrics: dict[str, float] = {"device_cuda": float(device.type == "cuda")}
    series: dict[str, list[float]] = {}
    backbones: dict[str, str] = {}            # value model -> sha256 of the weights its backbone started from
    checkpoints = run.settings.path(".checkpoints", "value_models")
    rollouts_md5 = run.inputs["rollouts"]
    distill_from = params["distill_from"]
    if distill_from and distill_from not in parameterizations:
        raise ValueError(f"value_models.distill_from {distill_from!r} names no value model trained here; "
                         f"trained: {', '.join(parameterizations)}")
    distill_config = config_from(DistillConfig, params["distill"], "value_models.distill", seed=params["seed"])
    preferred = params["default_parameterization"] or primary
    saved = parameterizations + ([DISTILLED] if distill_from else [])
    if preferred not in saved:
        raise ValueError(f"value_models.default_parameterization {preferred!r} names no value model trained here; "
                         f"trained: {', '.join(saved)}")
    base = None                               # the frozen base, loaded when a head is distilled onto it
    human = human_rows(run, tokenizer, df, stats)

    def save(model, name: str, parameterization: str, result: dict, loss: str, **meta) -> None:
        """A value model, its vas_value.json, and its metrics under its name."""
        model.save(tmp / name)
        backbones[name] = model.init_info["init_weights_sha256"]
        (tmp / name / META_FILE).write_text(json.dumps({
            "attribute": attribute, "parameterization": parameterization,
            "reward": f"learned_{attribute}", "reward_stats": stats[attribute],
            "rollouts_md5": rollouts_md5, "base_weights_sha256": base_sha,
            "device": result.get("device"), **meta,
        }, indent=2, sort_keys=True, default=str))
        series[f"{name}/{loss}"] = result.pop("loss_curve")[::5]
        for key, value in result.items():
            if isinstance(value, (int, float)):
                metrics[f"{name}/{key}"] = value

    with atomic_path(run.path("value_models")) as tmp:
        tmp.mkdir()
        for attribute in sorted(stats):
            data = training_rollouts(df, f"learned_{attribute}", tokenizer.eos_token_id, stats[attribute])
            # What the extra value models fit: the rollouts, and the human continuations where they were
            # scored by this attribute's reward (human_rows scores the extra models' attributes only).
            extra_data = data if human is None or f"learned_{attribute}" not in human else training_rollouts(
                pd.concat([df, human], ignore_index=True), f"learned_{attribute}", tokenizer.eos_token_id,
                stats[attribute])
            extra_for = params["extra_attributes"]
            planned = [p for p in parameterizations if p == primary or not extra_for or attribute in extra_for]
            default = default_parameterization(planned + ([DISTILLED] if distill_from in planned else []),
                                               primary, preferred)
            trained = {}                       # parameterization -> the value model just trained
            for parameterization in planned:
                name = value_model_name(attribute, parameterization, default)
                extra = {} if parameterization == primary else {
                    **({} if params["extra_train_steps"] is None else {"train_steps": params["extra_train_steps"]}),
                    **params["extra_config"]}
                train_config = run.config_for(ValueTrainConfig, ignore=(*VALUE_MODELS_OWN_KEYS, "rollouts"),
                                              parameterization=parameterization, **extra)
                train_data = data if parameterization == primary else extra_data
                init_dir = backbone_init_dir(params["backbone_init"], model_dir,
                                             run.path("reward_models") / attribute, params["backbone"],
                                             run.path("value_backbone"))
                # head_init reward_model: scalar models start as the reward model itself, the others at a zero head.
                start = reward_model_start(run.path("reward_models") / attribute, stats[attribute],
                                           AutoConfig.from_pretrained(model_dir).vocab_size) \
                    if params["head_init"] == "reward_model" and parameterization == "scalar" else None
                model, result = train_value_model(train_data, init_dir, train_config, pad_id=tokenizer.pad_token_id,
                                                  device=str(device), checkpoint_dir=checkpoints / name,
                                                  progress=run.log.info, init_model=start)
                trained[parameterization] = model
                save(model, name, parameterization, result, "td_loss",
                     train_config=train_config.__dict__ | {"prefix_lengths": list(train_config.prefix_lengths)},
                     human_continuations=len(train_data) - len(data))
                run.log.info(f"value model {name}: held-out corr(V(prefix), reward) "
                             + ", ".join(f"{k.removeprefix('corr_prefix_')}: {v:.2f}" for k, v in result.items()
                                         if k.startswith("corr_prefix_")))
            if distill_from in trained:
                # The per-token head reads the frozen base's own hidden states: saved by reference to it.
                base = base or load_frozen_base(base_dir, device=str(device))[0]
                student, result = distill_head(base, trained[distill_from].to(device), data, distill_config,
                                               tokenizer.pad_token_id, progress=run.log.info)
                student.init_info = {"init_from": str(model_dir), "init_weights_sha256": base_sha}
                save(student.cpu(), value_model_name(attribute, DISTILLED, default), DISTILLED, result,
                     "distill_loss", teacher=value_model_name(attribute, distill_from, default),
                     distill_config=dataclasses.asdict(distill_config), device=str(device))
    # The models are saved: checkpoints only served a run that might have been killed.
    for name in list(checkpoints.glob("*")):
        clear_checkpoint(name)
    version = keep_value_model_version(run)
    return Produced(metrics, series=series, metadata={"version_path": dg.MetadataValue.path(str(version)),
                                                      "backbone_weights_sha256": dg.MetadataValue.json(backbones)})
