"""Bradley-Terry reward models learned from preference pairs only, one per reward attribute.

A reward model is a Hugging Face sequence classifier with one output (for the embedded GPT-2
base: GPT2ForSequenceClassification, which reads the score at the last non-pad token). It
starts from the frozen base model's weights with a zero-initialized score head and is trained on
    loss = -log sigmoid(r(prompt + chosen) - r(prompt + rejected)),
the Bradley-Terry likelihood of the labels (as in TRL's RewardTrainer). The gold rewards are
never seen here, except by `gold_ceiling_accuracy`, which says how well the gold reward itself
agrees with the noisy labels: the most a learned reward can hope for.

The real-model path: `load_reward_model` loads any locally saved HF sequence classifier with a
single output (safetensors only, remote code only when asked).

What a reward model reads (`encode_texts`): `join_prompt_completion(prompt, completion)`,
framed like the base LM's training reviews, BOS text EOS, when the tokenizer adds no special
tokens of its own (GPT-2 style); tokenizers that do (BERT's [CLS] ... [SEP], Llama's <s>) get
their own framing. Texts longer than max_length keep their BEGINNING: prompts come first and
completions are short, so the cut, if any, falls at the end of a rambling completion.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from models.artifacts import atomic_path, visible_subfolders
from models.lm.lm import load_frozen_base, quiet_loading, truncated_copy
from models.lm.sampling import join_prompt_completion
from models.lm.train_utils import FrozenFeatures, autocast_for, dropout_off, pad_rows, positions, split_groups, warmup_lr
from models.progress import progress_bar
from models.rewards.rewards import gold_reward

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class RewardTrainConfig:
    # Defaults are params.yaml's `default` profile (tests/test_config_defaults.py holds them together).
    train_steps: int = 150
    batch_size: int = 32              # pairs per step (each step scores 2 * batch_size texts)
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    max_length: int = 128             # tokens per text, BOS/EOS included; clamped to the model's positions
    eval_fraction: float = 0.15       # held-out pairs, split by prompt so no prompt is in both
    seed: int = 0
    warmup_steps: int = 10            # linear warmup, then linear decay to 0 (HF Trainer's default)
    max_grad_norm: float = 1.0
    base_layers: int = 0              # > 0: start from the base model's first base_layers layers only
    # Train the score head only, on the body's features computed once per text (FrozenFeatures): a
    # probe of a large base model's own features, which a few hundred pairs cannot overfit as they
    # overfit a fine-tuned body.
    freeze_backbone: bool = False


# ---------------------------------------------------------------------------------------------
# Encoding and scoring


def _adds_special_tokens(tokenizer) -> bool:
    return tokenizer("a")["input_ids"] != tokenizer("a", add_special_tokens=False)["input_ids"]


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids a reward model reads for each text, at most max_length, beginning kept."""
    texts = list(texts)
    if _adds_special_tokens(tokenizer):
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    # An EOS equal to the pad token would be skipped by "last non-pad token" pooling, so it is left off.
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    suffix = [eos] if eos is not None and eos != pad else []
    room = max_length - len(prefix) - len(suffix)
    if room < 1:
        raise ValueError(f"max_length {max_length} leaves no room for text")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [prefix + row[:room] + suffix for row in ids]


def max_positions(model, max_length: int) -> int:
    """max_length, clamped to what the model's position embeddings cover."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(max_length, limit) if limit else max_length


def reward_forward(model, rows: list[list[int]], pad_id: int, padding_side: str, device) -> torch.Tensor:
    """Scalar rewards (B,) in float32 for token rows, with gradients if enabled."""
    device = torch.device(device)
    ids, mask = pad_rows(rows, pad_id, padding_side)
    ids, mask = ids.to(device), mask.to(device)
    kwargs = {}
    # Left padding shifts every row: learned absolute positions (GPT-2) must then start at each
    # row's first real token. Right padding leaves positions to the model, which every
    # architecture gets right on its own (RoBERTa, for one, offsets them itself).
    if padding_side == "left" and "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = positions(mask)
    with autocast_for(device):
        logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    return logits[:, 0].float()


@torch.no_grad()
def score_rows(model, rows: list[list[int]], pad_id: int, padding_side: str, device,
               batch_size: int = 64) -> list[float]:
    """Scores of token rows, batched by similar length (less padding), returned in input order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out = reward_forward(model, [rows[i] for i in chunk], pad_id, padding_side, device).cpu().tolist()
        for i, s in zip(chunk, out):
            scores[i] = s
    return scores


class RewardScorer:
    """Scores (prompt, completion) pairs with a frozen sequence classifier; batched, no grad.

    Pads on the right by default, whatever the tokenizer's own side (the embedded base tokenizer
    pads left, for generation): right padding is correct for every pooling, the last non-pad
    token (GPT-2, Llama) as well as the first token (BERT's [CLS]). Left padding gives the same
    scores for last-token pooling only.
    """

    def __init__(self, model, tokenizer, device="cpu", max_length: int = 128, batch_size: int = 64,
                 padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_length = max_positions(model, max_length)
        self.batch_size = batch_size
        self.padding_side = padding_side

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Scores of already joined texts (prompt + completion)."""
        if len(texts) == 0:
            return []
        rows = encode_texts(self.tokenizer, texts, self.max_length)
        return score_rows(self.model, rows, self.tokenizer.pad_token_id, self.padding_side, self.device,
                          self.batch_size)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return self.score_texts([join_prompt_completion(p, c) for p, c in zip(prompts, completions)])


# ---------------------------------------------------------------------------------------------
# Accuracy against labels


def pair_accuracy(scores_chosen: Sequence[float], scores_rejected: Sequence[float]) -> float:
    """Fraction of pairs where chosen scores above rejected; ties count 1/2 (a coin flip)."""
    a, b = np.asarray(scores_chosen, dtype=float), np.asarray(scores_rejected, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} chosen scores but {b.size} rejected scores")
    if a.size == 0:
        raise ValueError("pair_accuracy of no pairs is undefined")
    return float(np.mean((a > b) + 0.5 * (a == b)))


def gold_ceiling_accuracy(pairs: pd.DataFrame, attribute: str) -> float:
    """Accuracy of the GOLD reward on these (noisy) labels, scoring the completion text only, as
    the labels were drawn. Bradley-Terry labels flip close pairs, so this is below 1: it is the
    ceiling a learned reward is compared with."""
    score = gold_reward(attribute)
    return pair_accuracy(score(pairs.chosen.tolist()), score(pairs.rejected.tolist()))


# ---------------------------------------------------------------------------------------------
# Building, training, saving, loading


def _zero_score_head(model) -> None:
    """Zero the final output layer(s) outside the backbone: every text starts at reward 0, the
    loss at exactly log 2, and no random offset per text has to be unlearned. Hidden layers of
    a head (RoBERTa's dense) keep their init, or the head would never receive a gradient."""
    prefix = model.base_model_prefix + "."
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Linear) and not name.startswith(prefix)
                and module.out_features == model.config.num_labels):
            torch.nn.init.zeros_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def reward_model_from_base(base_dir: str | Path, base_layers: int = 0):
    """A one-output sequence classifier with the frozen base model's backbone (its first
    base_layers layers when > 0: a cheap reward model of a large base) and a zero head.

    The base loads through `load_frozen_base`, which refuses weights changed since they were
    pinned. Returns (model, tokenizer) on CPU.
    """
    from transformers import AutoModelForSequenceClassification  # heavy: only when a model is built

    lm, tokenizer, manifest = load_frozen_base(base_dir)
    if base_layers:
        lm = truncated_copy(lm, base_layers)
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id     # GPT-2 pooling finds the last non-pad token
    config.architectures = None
    model = AutoModelForSequenceClassification.from_config(
        config, trust_remote_code=manifest.get("trust_remote_code", False))
    # Same backbone class under both heads (GPT2Model for GPT-2): copy it over exactly.
    model.base_model.load_state_dict(lm.base_model.state_dict(), strict=True)
    _zero_score_head(model)
    dropout_off(model)      # chosen and rejected must be scored by one function, or their difference is noise
    # float32 master weights even when the base was stored in bf16: CUDA autocast does the bf16.
    return model.float(), tokenizer


def split_by_prompt(pairs: pd.DataFrame, eval_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out rows: a seeded eval_fraction of the prompts (by prompt_id when
    present, else by prompt text) with all their pairs, so no prompt is in both splits (the value
    models' rule, `split_groups`). Empty when there is nothing to split (eval_fraction 0, or a
    fraction of the prompts that rounds to none)."""
    groups = pairs["prompt_id"] if "prompt_id" in pairs.columns else pairs["prompt"]
    held = np.zeros(len(pairs), dtype=bool)
    held[split_groups(groups.tolist(), eval_fraction, seed)[1]] = True
    return held


def _batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator, pool: int = 8):
    """Endless index batches: shuffled passes over the pairs, each pair once per pass.

    Within a pass, each run of `pool` batches is sorted by length before it is cut, and the
    pass's batches come in random order: a batch then holds pairs of similar length, so far less
    padding (about 1.8x faster on CPU for the default world's 10-90 token texts).
    """
    n = len(lengths)
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        batches = []
        for start in range(0, n, batch_size * pool):
            run = sorted(perm[start : start + batch_size * pool], key=lambda i: lengths[i])
            batches += [run[k : k + batch_size] for k in range(0, len(run), batch_size)]
        for j in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[j]


def _check_pairs(pairs: pd.DataFrame) -> None:
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise ValueError(f"preference pairs lack column(s) {missing}; have {list(pairs.columns)}")
    if len(pairs) == 0:
        raise ValueError("no preference pairs to train a reward model on")
    if "attribute" in pairs.columns and pairs.attribute.nunique() > 1:
        raise ValueError(f"pairs mix attributes {sorted(pairs.attribute.unique())}; train one reward model "
                         "per attribute on that attribute's pairs")


def _encode_pairs(tokenizer, frame: pd.DataFrame, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    chosen = [join_prompt_completion(p, c) for p, c in zip(frame.prompt, frame.chosen)]
    rejected = [join_prompt_completion(p, r) for p, r in zip(frame.prompt, frame.rejected)]
    return encode_texts(tokenizer, chosen, max_length), encode_texts(tokenizer, rejected, max_length)


def train_reward_model(pairs: pd.DataFrame, base_dir, config: RewardTrainConfig, device="cpu",
                       progress: Callable[[str], None] = log.info):
    """Fit a Bradley-Terry reward model on pairs (prompt, chosen, rejected[, prompt_id]).

    Returns (model on CPU in eval mode, tokenizer, metrics). metrics["eval_index"] lists the
    held-out rows' index labels in `pairs` and metrics["eval_margins"] their reward margins, so the
    caller can compare with the gold ceiling on exactly those pairs, or on a subset of them.

    A hand-written loop rather than TRL's RewardTrainer (which DPO uses): on the default world's
    reward model (GPT-2, 4 layers x 128, 1.3k pairs of 10-90 tokens, batch 32, one CPU thread) it
    runs 30 steps in 14.5 s against RewardTrainer's 18.6 s (1.3x), because its batches hold pairs
    of similar length (less padding); it also trains for 0 steps (an untrained baseline), which
    the HF Trainer reads as "train by epochs".
    """
    _check_pairs(pairs)
    torch.manual_seed(config.seed)
    dev = torch.device(device)
    model, tokenizer = reward_model_from_base(base_dir, config.base_layers)
    max_length = max_positions(model, config.max_length)
    pad, side = tokenizer.pad_token_id, "right"     # see RewardScorer: right is safe for any pooling

    held = split_by_prompt(pairs, config.eval_fraction, config.seed)
    train_chosen, train_rejected = _encode_pairs(tokenizer, pairs[~held], max_length)
    eval_chosen, eval_rejected = _encode_pairs(tokenizer, pairs[held], max_length)
    n_train = len(train_chosen)
    if not n_train:
        raise ValueError("no training pairs left after the held-out split; lower eval_fraction")
    progress(f"reward model: {n_train} train pairs, {len(eval_chosen)} held-out pairs (split by prompt), "
             f"device {dev}")

    if config.freeze_backbone:
        setattr(model, model.base_model_prefix, FrozenFeatures(model.base_model))
    model.to(dev).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, max(1, config.train_steps // 10))
    gen = torch.Generator().manual_seed(config.seed)
    # Chosen and rejected share one padded forward, so a pair is as long as its longer text.
    batches = _batches([max(len(c), len(r)) for c, r in zip(train_chosen, train_rejected)], config.batch_size, gen)
    losses: list[float] = []
    accuracies: list[float] = []
    n_seen = 0
    every = max(1, config.train_steps // 10)
    start = time.perf_counter()
    for step in progress_bar(range(config.train_steps), "reward model", unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(step, config.learning_rate, warmup, config.train_steps)
        idx = next(batches)
        # Chosen and rejected go through one forward: one padded batch of 2B texts.
        rows = [train_chosen[i] for i in idx] + [train_rejected[i] for i in idx]
        scores = reward_forward(model, rows, pad, side, dev)
        margin = scores[: len(idx)] - scores[len(idx):]
        loss = -F.logsigmoid(margin).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        accuracies.append(float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean()))
        n_seen += len(idx)
        if (step + 1) % every == 0 or step + 1 == config.train_steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            progress(f"reward model step {step + 1}/{config.train_steps}: loss {recent:.4f}, "
                     f"{n_seen / (time.perf_counter() - start):.0f} pairs/s")
    train_seconds = time.perf_counter() - start

    model.eval()
    heldout_accuracy = heldout_loss = float("nan")
    margins = torch.zeros(0)
    if eval_chosen:
        s_chosen = score_rows(model, eval_chosen, pad, side, dev)
        s_rejected = score_rows(model, eval_rejected, pad, side, dev)
        heldout_accuracy = pair_accuracy(s_chosen, s_rejected)
        margins = torch.tensor(s_chosen) - torch.tensor(s_rejected)
        heldout_loss = float(-F.logsigmoid(margins).mean())
        progress(f"reward model held-out: accuracy {heldout_accuracy:.3f}, loss {heldout_loss:.4f}")
    else:
        progress("reward model: no held-out pairs (a single prompt or eval_fraction 0)")

    def tail_mean(values: list[float]) -> float:
        return float(sum(values[-50:]) / len(values[-50:])) if values else float("nan")

    metrics = {
        "train_loss": tail_mean(losses),
        "train_accuracy": tail_mean(accuracies),
        "loss_curve": losses,
        "heldout_accuracy": heldout_accuracy,
        "heldout_loss": heldout_loss,
        "n_train_pairs": n_train,
        "n_eval_pairs": len(eval_chosen),
        "train_seconds": train_seconds,
        "pairs_per_second": n_seen / train_seconds if train_seconds > 0 else float("nan"),
        "max_length": max_length,
        "device": str(dev),
        "eval_index": pairs.index[held].tolist(),
        "eval_margins": margins.tolist(),     # r(chosen) - r(rejected) of each held-out pair, as eval_index
    }
    if isinstance(model.base_model, FrozenFeatures):
        setattr(model, model.base_model_prefix, model.base_model.inner)   # the plain body again, to save
    return model.cpu().eval(), tokenizer, metrics


def save_reward_model(model, tokenizer, directory) -> None:
    """Hugging Face format, safetensors weights, written to a temporary folder and renamed."""
    with atomic_path(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def load_reward_model(directory, device="cpu", trust_remote_code: bool = False, max_length: int = 128,
                      batch_size: int = 64) -> RewardScorer:
    """A frozen scorer from a local HF sequence classifier folder with a single output.

    Works for models saved by `save_reward_model` and for any user-supplied classifier saved
    locally; never downloads, loads safetensors only, runs remote code only when asked.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # heavy: only when loading

    quiet_loading()
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"reward model directory {path} does not exist; train reward_models first "
                                "or point the config at a local Hugging Face sequence classifier")
    if not list(path.glob("*.safetensors")):
        raise FileNotFoundError(f"no .safetensors weights in reward model directory {path}; "
                                "only safetensors are loaded")
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True, **kwargs)
    if model.config.num_labels != 1:
        raise ValueError(f"reward model in {path} has {model.config.num_labels} outputs; a reward model "
                         "is a sequence classifier with num_labels=1")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    return RewardScorer(model, tokenizer, device=device, max_length=max_length, batch_size=batch_size)


def load_reward_models(directory, device="cpu") -> dict[str, RewardScorer]:
    """Every reward model under a reward_models folder, by attribute (its subfolder's name).

    Hidden folders (atomic-write temporaries) are skipped."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"reward models folder {root} does not exist: materialize reward_models first")
    return {p.name: load_reward_model(p, device=device) for p in visible_subfolders(root)}
