"""Decode with VAS from the latest materialized models: the Python API behind `vas generate`.

Default locations under data_dir: the frozen base model in base_model/, one value model per
reward attribute in value_models/<attribute>/, one learned reward model per attribute in
reward_models/<attribute>/ (used only to score what was generated).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from models.stages import output_of
from models.value.value_store import find_value_models

if TYPE_CHECKING:
    from models.decoding.upstream import UpstreamConfig
    from models.decoding.vas import VASConfig
    from models.lm.sampling import SamplingConfig

log = logging.getLogger(__name__)

VALUE_MODELS = output_of("value_models")
REWARD_MODELS = output_of("reward_models")


def _check_weights(weights: Mapping[str, float], available: Mapping[str, Path], data_dir: Path) -> None:
    missing = sorted(set(weights) - set(available))
    if missing:
        have = ", ".join(sorted(available)) or "none"
        raise ValueError(
            f"no value model for {', '.join(missing)} (available: {have}; looked in {data_dir / VALUE_MODELS}). "
            f"Create them with `vas materialize value_models`, or point at a saved one with "
            f"--value-model {missing[0]}=PATH (value_model_dirs in Python)."
        )


def reward_scorers(data_dir: str | Path, reward_model_dirs: Mapping[str, str] | None = None,
                   device: str = "cpu") -> dict:
    """Every available learned reward model, {attribute: scorer}, loaded once (the server keeps them)."""
    from models.artifacts import visible_subfolders  # pandas: the CLI starts without it
    from models.rewards.reward_model import load_reward_model  # torch: only when scoring

    # None materialized yet ({}): scores are extra information, never a reason for generation to fail.
    dirs = {p.name: p for p in visible_subfolders(Path(data_dir) / REWARD_MODELS)}
    dirs.update({name: Path(p) for name, p in (reward_model_dirs or {}).items()})
    return {name: load_reward_model(path, device=device) for name, path in dirs.items()}


def score_all(scorers: Mapping, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, list[float]]:
    return {name: [float(s) for s in scorer(list(prompts), list(completions))] for name, scorer in scorers.items()}


def decode_configs(**decode) -> tuple[SamplingConfig, VASConfig]:
    """The sampling and VAS settings of a decode: SamplingConfig's and VASConfig's own defaults
    (the one place they are declared), with every argument that is not None put over them."""
    from models.decoding.vas import VASConfig
    from models.lm.sampling import SamplingConfig  # torch: only when decoding

    given = {k: v for k, v in decode.items() if v is not None}
    sampling = {f.name for f in dataclasses.fields(SamplingConfig)}
    vas = {f.name for f in dataclasses.fields(VASConfig)}
    unknown = set(given) - sampling - vas
    if unknown:
        raise TypeError(f"unknown decode setting(s) {sorted(unknown)}")
    return (SamplingConfig(**{k: v for k, v in given.items() if k in sampling}),
            VASConfig(**{k: v for k, v in given.items() if k in vas}))


def generate(prompts: str | Sequence[str], weights: Mapping[str, float], n: int = 4, data_dir: str | Path = "data",
             base_model_dir: str | Path | None = None, value_model_dirs: Mapping[str, str] | None = None,
             reward_model_dirs: Mapping[str, str] | None = None, device: str = "auto",
             upstream: UpstreamConfig | None = None, **decode) -> list[dict]:
    """n VAS completions per prompt, weights per attribute; one dict per completion, in prompt order.

    upstream: black-box VAS on the base model behind an OpenAI-compatible API (models/decoding/upstream.py,
    models/decoding/blackbox.py) instead of the local one; only the local base model's tokenizer is read (the
    value models' own). Each dict then has upstream: {requests, prompt_tokens, dropped_mass}.

    decode: SamplingConfig and VASConfig fields (seed, temperature, max_new_tokens, batch_size,
    top_k, mask_outside_top_k, soft, calibrated); None or absent keeps the decoder's default. soft
    (default True): distributional value models steer with the soft value at their weight (the exact
    tilt); False uses their mean (the paper's VAS). calibrated (default False): values of the
    reward's normal score under pi0 instead of the reward (value models with calibrated bins).

    Each dict: prompt, completion, kl_nats, n_tokens, and learned_<attribute> per reward model found.
    """
    from models.lm.lm import load_frozen_base, pick_device  # torch: only when decoding
    from models.value.value_model import ValueModel

    sampling, vas = decode_configs(**decode)    # before loading anything: fail fast on a bad setting
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if n < 1 or not prompt_list:
        raise ValueError(f"need at least one prompt and n >= 1, got {len(prompt_list)} prompt(s) and n={n}")
    data_dir = Path(data_dir)
    available = find_value_models(data_dir / VALUE_MODELS, value_model_dirs)
    _check_weights(weights, available, data_dir)   # before loading anything: fail fast on a typo

    dev = pick_device(device)
    base_dir = base_model_dir or data_dir / output_of("base_model")
    if upstream is not None:
        from models.decoding.upstream import UpstreamClient

        base, tokenizer, client = None, value_tokenizer(base_dir), UpstreamClient(upstream)
    else:
        (base, tokenizer, _), client = load_frozen_base(base_dir, device=str(dev)), None
    # Weight-0 models are not even loaded: they would not be run.
    active = {name: float(w) for name, w in weights.items() if float(w) != 0.0}
    value_models = {name: ValueModel.load(available[name], device=dev, base_model=base) for name in active}

    expanded = [p for p in prompt_list for _ in range(n)]
    scorers = reward_scorers(data_dir, reward_model_dirs, str(dev))
    rows = decode_rows(base, tokenizer, expanded, value_models, active, sampling, vas, dev, scorers, upstream=client)
    return [{k: v for k, v in row.items() if k not in ("finished", "completion_ids", "base_logprobs")} for row in rows]


def value_tokenizer(base_dir: str | Path):
    """The value models' own tokenizer, the one they were trained with: the local base model's,
    read alone (black-box VAS never loads the base weights, nor uses the upstream's tokenizer)."""
    from models.lm.lm import base_model_dir, load_tokenizer

    return load_tokenizer(base_model_dir(base_dir))


def decode_rows(base, tokenizer, prompts: Sequence[str], value_models: Mapping, weights: Mapping[str, float],
                sampling: SamplingConfig, vas: VASConfig, device, scorers: Mapping, watch=None,
                upstream=None, scheduler=None, score=None, schedule: dict | None = None) -> list[dict]:
    """One VAS completion per prompt (repeat a prompt for several), each scored by every learned
    reward model: the decode of `vas generate` and of `vas serve`.

    upstream: a models.decoding.upstream.UpstreamClient, for black-box VAS on a base model behind an API
    (models/decoding/blackbox.py; base is then unused and tokenizer is the value models' own).
    Each dict: prompt, completion, kl_nats, n_tokens, finished, then completion_ids and
    base_logprobs (local base) or upstream (requests, prompt_tokens, dropped_mass), and
    learned_<attribute> per scorer. watch: told each step's tokens while decoding (models.decoding.vas.Watched).
    scheduler: a models.serving.scheduler.Scheduler, whose running batch decodes these rows beside other
    requests' (`vas serve`), with the tokens vas_sample would draw."""
    if upstream is not None:
        from models.decoding.blackbox import blackbox_rows

        rows = blackbox_rows(upstream, tokenizer, list(prompts), value_models, weights, sampling, vas, watch=watch)
    else:
        from models.decoding.vas import vas_sample

        gen = (scheduler.generate(list(prompts), value_models, weights, sampling, vas, watch=watch, **(schedule or {}))
               if scheduler
               else vas_sample(base, tokenizer, list(prompts), value_models, weights, sampling, vas, device=device,
                               watch=watch))
        rows = [{"prompt": p, "completion": c, "kl_nats": kl, "n_tokens": nt, "finished": f, "completion_ids": ids,
                 "base_logprobs": lp}
                for p, c, kl, nt, f, ids, lp in zip(gen.prompts, gen.texts, gen.kl_nats, gen.n_tokens, gen.finished,
                                                     gen.completion_ids, gen.base_logprobs)]
    score = score or (lambda prompts, completions: score_all(scorers, prompts, completions))
    for name, scores in score([r["prompt"] for r in rows], [r["completion"] for r in rows]).items():
        for row, value in zip(rows, scores):
            row[f"learned_{name}"] = value
    return rows
