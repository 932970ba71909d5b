"""Fit a value model of the frozen base policy by TD(lambda) on its own rollouts.

No policy is trained: the rollouts come from pi0, so V estimates pi0's expected terminal reward
from every prefix. Training checkpoints every `checkpoint_every` steps and resumes from the last
checkpoint when re-run after a kill (same data and config), landing on the same weights.

Under torchrun (models/value/train_value_distributed.py) the same function trains data-parallel: every
rank computes the step's global rows, takes its own slice, and DDP sums the gradients into the
whole batch's, so any number of processes lands on the single process's weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from models.data.rollouts import Rollouts
from models.lm.train_utils import FrozenFeatures, autocast_for, pad_rows, split_groups
from models.progress import progress_bar
from models.value import distributed
from models.value.checkpoints import load_checkpoint, save_checkpoint
from models.value.distributional import (
    Support,
    calibrated_support,
    distributional_lambda_returns,
    histogram_cross_entropy,
    hl_gauss,
)
from models.value.td import lambda_returns, masked_mse

log = logging.getLogger(__name__)


@dataclass
class ValueTrainConfig:
    # scalar (V(s·a), the paper), qhead, distributional, distributional_qhead
    parameterization: str = "distributional_qhead"
    train_steps: int = 1800
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lam: float = 0.95
    gamma: float = 1.0
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1              # held-out rollouts, split by prompt
    checkpoint_every: int = 100
    seed: int = 0
    prefix_lengths: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    # Distributional heads: n_bins over [v_min, v_max] in standardized reward units; None takes the
    # training rewards' own range. The soft value at a large beta is decided by the top bins, so
    # bins no reward can reach would only collect spurious mass that the soft value then amplifies.
    n_bins: int = 41
    v_min: float | None = None
    v_max: float | None = None
    # Bins over the normal scores of the rewards (models/value/distributional.py): equal resolution for
    # every quantile of pi0's rewards, so the saturated top where Best-of-N selects is resolved, and
    # the calibrated decoder (values in pi0-quantile units) becomes available. v_min/v_max must be None.
    calibrated_bins: bool = True
    rank: int = 16
    # distributional_qhead's token factors: "free" (a learned vector per token id) or "embedding" (a
    # learned projection of the backbone's token embeddings: for real vocabularies, ValueModel.factors)
    token_factors: str = "free"
    # Rows per forward within a step (0 = the whole batch): the step's rows sorted by length and cut
    # into micro-batches, each padded only to its own longest row. The gradient is the whole batch's.
    micro_batch_size: int = 16
    # Train the head only, on the backbone's features computed once per rollout (FrozenFeatures):
    # a value head on a large frozen model, e.g. the base model's own body, which the decoder then
    # shares instead of running a second forward (models/decoding/vas.py). Saved by reference, not copied.
    freeze_backbone: bool = False


def make_batch(rollouts: Rollouts, index: Sequence[int], pad_id: int):
    """Right-padded (B, T) ids, attention mask, action mask, and (B,) rewards."""
    ids, attention = pad_rows([rollouts.prompt_ids[i] + rollouts.action_ids[i] for i in index], pad_id, "right")
    actions = torch.zeros_like(attention)
    for row, i in enumerate(index):
        n_prompt, n_act = len(rollouts.prompt_ids[i]), len(rollouts.action_ids[i])
        actions[row, n_prompt : n_prompt + n_act] = 1
    rewards = torch.tensor([rollouts.rewards[i] for i in index], dtype=torch.float32)
    return ids, attention, actions, rewards


def split_by_group(rollouts: Rollouts, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train/eval indices; a prompt's rollouts all land on one side."""
    return split_groups(rollouts.groups or [str(i) for i in range(len(rollouts))], eval_fraction, seed)


def micro_batches(rollouts: Rollouts, index: Sequence[int], size: int) -> list[list[int]]:
    """A step's rows sorted by length and cut into micro-batches of at most `size` rows (0: one).

    A random batch pads to its longest row: about twice the tokens it holds here (completions end
    anywhere from 1 to 80 tokens), and padding costs as much compute as tokens. Sorted micro-batches
    pad less, and since their losses are summed weighted by action count (train_value_model), the
    step's gradient equals the whole batch's up to float rounding.
    """
    ordered = sorted(index, key=lambda i: (len(rollouts.prompt_ids[i]) + len(rollouts.action_ids[i]), i))
    size = size if size > 0 else len(ordered)
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The rows of a training step, a pure function of (seed, step): resuming replays the same order."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[offset * batch_size : (offset + 1) * batch_size].tolist()


# -- training --------------------------------------------------------------------------------

def fingerprint_of(rollouts: Rollouts, config: ValueTrainConfig, model_dir, start: dict | None = None) -> str:
    """What a checkpoint must match to be resumed: the data, the config, where the backbone starts
    and, for a run started from a given value model (init_model), that model's init_info."""
    settings = {k: v for k, v in asdict(config).items() if k != "checkpoint_every"}
    blob = json.dumps({"data": rollouts.digest(), "config": settings, "base": str(model_dir),
                       **({"start": start} if start is not None else {})}, sort_keys=True, default=str)
    return hashlib.md5(blob.encode()).hexdigest()


BACKBONE_INITS = ("value_backbone", "base", "reward_model")


def backbone_init_dir(backbone_init: str, base_dir, reward_model_dir, backbone: str = "",
                      value_backbone_dir=None):
    """Where a value model's backbone starts: the pipeline's small value backbone (a GPT-2 a
    fraction of the base model's size, trained on the corpus with the base tokenizer: the
    `value_backbone` asset), the base model's body (the paper starts from an LM of the base
    tokenizer), or the body of the reward model it learns to predict, whose features already
    encode that reward (as RLHF critics start from the reward model). A `backbone` of its own (a
    local HF causal LM, or a hub id in the HF cache) overrides them all: it may be smaller than the
    base model but must share its vocabulary (checked against base_dir's tokenizer), as the value
    backbone must."""
    from models.lm.lm import check_same_vocabulary, resolve_model_dir

    if backbone:
        path = resolve_model_dir(backbone, what="value_models.backbone", fix="download it into the cache first")
        check_same_vocabulary(base_dir, path, what="value_models.backbone")
        return path
    if backbone_init == "value_backbone":
        if value_backbone_dir is None:
            raise ValueError("value_models.backbone_init 'value_backbone' needs the value_backbone asset's folder")
        check_same_vocabulary(base_dir, value_backbone_dir, what="value_backbone")
        return value_backbone_dir
    if backbone_init == "base":
        return base_dir
    if backbone_init == "reward_model":
        return reward_model_dir
    raise ValueError(f"value_models.backbone_init must be one of {', '.join(map(repr, BACKBONE_INITS))}, "
                     f"got {backbone_init!r}")


def support_for(rollouts: Rollouts, config: ValueTrainConfig) -> Support:
    """The bins of a distributional head: the configured range, or the rewards' own range padded by
    3 HL-Gauss sigmas on each side. Without the padding the Gaussian of a reward at the edge is cut
    off and renormalized, so the best rewards' histograms lose the spread every other reward's
    has, and their soft values, which grow with that spread, come out too low."""
    sigmas = 3 * Support.sigma_ratio                       # padding per side, in bin widths
    low, high = min(rollouts.rewards), max(rollouts.rewards)
    if not high > low:
        high = low + 1.0                     # every reward equal: any non-empty range holds them
    width = (high - low) / max(config.n_bins - 2 * sigmas, 1.0)
    low = config.v_min if config.v_min is not None else low - sigmas * width
    high = config.v_max if config.v_max is not None else high + sigmas * width
    return Support(v_min=float(low), v_max=float(high), n_bins=config.n_bins)


def calibrated_targets(rollouts: Rollouts, config: ValueTrainConfig, support: Support | None):
    """(support, rollouts with the rewards the head is fitted to). Calibrated bins fit normal scores:
    of these rollouts' own rewards for a fresh head, or through the given calibrated support's map
    (a head that continues training keeps its units). Like support_for's range, the map is fitted
    on every rollout given, held-out ones included: a fixed monotone relabelling of the targets;
    evaluate_value_model compares values in reward units."""
    if support is None:
        if config.v_min is not None or config.v_max is not None:
            raise ValueError("value_models.v_min/v_max fix bins in reward units; calibrated bins take "
                             "their range from the normal scores: set calibrated_bins false or drop v_min/v_max")
        support, z = calibrated_support(rollouts.rewards, config.n_bins)
    else:
        z = support.normal_scores_of(rollouts.rewards)
    return support, Rollouts(rollouts.prompt_ids, rollouts.action_ids, [float(v) for v in z], rollouts.groups)


def td_loss(model, outputs: torch.Tensor, rewards: torch.Tensor, actions: torch.Tensor,
            config: ValueTrainConfig) -> torch.Tensor:
    """TD(lambda) loss of one batch. Targets come from the outputs as they are at the start of the
    batch: with dropout off, the detached outputs are exactly a frozen copy's, without a second
    forward pass. Scalar values: masked MSE to lambda-returns. Histograms: cross-entropy to the
    distributional lambda-returns, which end at the HL-Gauss histogram of the reward."""
    if not model.is_distributional:
        targets = lambda_returns(outputs.detach(), rewards, actions, config.lam, config.gamma)
        return masked_mse(outputs, targets, actions)
    probs = torch.softmax(outputs.detach().float(), -1)
    targets = distributional_lambda_returns(probs, hl_gauss(rewards, model.support), actions, config.lam)
    return histogram_cross_entropy(outputs, targets, actions)


def action_count(rollouts: Rollouts, index: Sequence[int]) -> int:
    return sum(len(rollouts.action_ids[i]) for i in index)


def backward_step(model, rollouts: Rollouts, index: Sequence[int], pad_id: int, config: ValueTrainConfig,
                  device, n_actions: int | None = None) -> tuple[float, int]:
    """Accumulate the gradient of one step's TD loss over its micro-batches: (loss, real tokens).

    n_actions: the action tokens of the whole step (default: those of `index`). Under DDP `index`
    is this rank's share of the step and n_actions the step's total, so each rank's loss is its
    share of the whole batch's mean, and the returned losses of the ranks sum to the step's loss."""
    n_actions = action_count(rollouts, index) if n_actions is None else n_actions
    # DDP averages the ranks' gradients; scaled by the number of ranks, that average is their sum.
    ranks = distributed.gradient_ranks(model)
    step_loss, n_tokens = 0.0, 0
    chunks = micro_batches(rollouts, index, config.micro_batch_size)
    for k, rows in enumerate(chunks):
        ids, attention, actions, rewards = (t.to(device) for t in make_batch(rollouts, rows, pad_id))
        with distributed.sync_gradients(model, sync=k == len(chunks) - 1):
            with autocast_for(device):
                outputs = model(ids, attention, actions)                    # (b, T) or (b, T, n_bins)
            # td_loss is a mean over the micro-batch's actions: weighted by their share of the
            # step's actions, the summed losses are the mean over the whole batch.
            loss = td_loss(distributed.unwrap(model), outputs, rewards, actions, config) \
                * (int(actions.sum()) / max(n_actions, 1))
            (loss * ranks).backward()
        step_loss += loss.item()
        n_tokens += int(attention.sum())
    return step_loss, n_tokens


def train_value_model(rollouts: Rollouts, model_dir, config: ValueTrainConfig, pad_id: int,
                      device: str = "auto", checkpoint_dir: str | Path | None = None,
                      progress: Callable[[str], None] = log.info, init_model=None):
    """Returns (value model on CPU in eval mode, metrics).

    The model starts from model_dir's weights with a zero head, or, given init_model, from a copy
    of that value model (a second round fitted on new rollouts, as iterated VAS does).

    In a torch.distributed run (process group initialized) every rank calls this with the same
    arguments: each trains on its slice of every step, rank 0 alone logs through `progress` and
    writes checkpoints, and only rank 0's metrics hold the held-out evaluation."""
    from models.value.value_model import DISTRIBUTIONAL, ValueModel

    dev = distributed.local_device(device)
    torch.manual_seed(config.seed)
    train_idx, eval_idx = split_by_group(rollouts, config.eval_fraction, config.seed)
    if not train_idx:
        raise ValueError("no training rollouts left after the held-out split; lower eval_fraction")
    distributed.shard(range(min(config.batch_size, len(train_idx))))   # a step the ranks cannot split fails here
    if not distributed.is_main():
        progress = _silent                    # one log per run, not one per rank
    fitted = rollouts                         # the rewards the head is fitted to (normal scores for calibrated bins)
    calibrated = config.calibrated_bins and config.parameterization in DISTRIBUTIONAL
    if init_model is not None:
        import copy

        model = copy.deepcopy(init_model).to(dev)
        if model.is_distributional and model.support.calibrated != calibrated:
            log.info(f"continuing a value model with {'calibrated' if model.support.calibrated else 'uniform'} "
                     "bins: it keeps them, whatever calibrated_bins says")
        if model.is_distributional and model.support.calibrated:
            _, fitted = calibrated_targets(rollouts, config, model.support)
    else:
        support, fitted = (calibrated_targets(rollouts, config, None) if calibrated
                           else (support_for(rollouts, config), rollouts))
        model = ValueModel.from_base(model_dir, parameterization=config.parameterization,
                                     support=support, rank=config.rank, token_factors=config.token_factors).to(dev)
    if model.is_distributional and config.gamma != 1.0:
        raise ValueError("distributional TD(lambda) needs gamma = 1: a discounted histogram is not a mixture "
                         f"of histograms on the same bins (got gamma {config.gamma})")
    if config.freeze_backbone:
        model.frozen_backbone = True
        model.backbone = FrozenFeatures(model.backbone)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    fingerprint = fingerprint_of(rollouts, config, model_dir,
                                 None if init_model is None else getattr(init_model, "init_info", {}) or {"given": True})
    start_step, losses = 0, []
    if checkpoint_dir is not None:
        # Every rank loads the same files, into the bare module, before DDP wraps it.
        start_step, losses = load_checkpoint(Path(checkpoint_dir), model, optimizer, fingerprint, dev)
        if start_step:
            progress(f"resuming value training from checkpoint at step {start_step}/{config.train_steps}")
    train = fitted.subset(train_idx)
    ddp = distributed.wrap(model, dev)
    progress(f"value model ({config.parameterization}): {len(train)} train / {len(eval_idx)} held-out rollouts, "
             f"{config.train_steps} steps, device {dev}")
    log_every = max(1, config.train_steps // 10)
    n_tokens, started = 0, time.perf_counter()
    steps = range(start_step, config.train_steps)
    for step in progress_bar(steps, f"value model ({config.parameterization})", total=config.train_steps,
                             unit="step", initial=start_step, enabled=distributed.is_main()):
        index = batch_indices(len(train), config.batch_size, step, config.seed)   # the global batch
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_tokens = backward_step(ddp, train, distributed.shard(index), pad_id, config, dev,
                                               n_actions=action_count(train, index))
        step_loss, step_tokens = distributed.all_sum([step_loss, step_tokens], dev)
        n_tokens += int(step_tokens)
        # DDP left every rank the same summed gradient: the same clip and update everywhere.
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        losses.append(step_loss)
        done = step + 1
        if done % log_every == 0 or done == config.train_steps:
            recent = losses[-log_every:]
            progress(f"value step {done}/{config.train_steps}: TD loss {sum(recent) / len(recent):.4f}, "
                     f"{n_tokens / (time.perf_counter() - started):.0f} tokens/s")
        if checkpoint_dir is not None and (done % config.checkpoint_every == 0 or done == config.train_steps):
            if distributed.is_main():      # the bare module's keys: it resumes with or without DDP
                save_checkpoint(Path(checkpoint_dir), model, optimizer, done, losses, fingerprint)
            distributed.barrier()          # no rank moves on before the checkpoint is whole
    seconds = time.perf_counter() - started
    model.eval()
    metrics = {
        "train_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "loss_curve": losses,
        "train_seconds": seconds,
        "train_tokens_per_s": n_tokens / seconds if n_tokens else float("nan"),
        "n_train_rollouts": len(train_idx),
        "n_eval_rollouts": len(eval_idx),
        "resumed_from_step": start_step,
        "device": str(dev),
    }
    if eval_idx and distributed.is_main():
        metrics.update(evaluate_value_model(model, rollouts.subset(eval_idx), pad_id, config.prefix_lengths, dev))
    if isinstance(model.backbone, FrozenFeatures):
        model.backbone = model.backbone.inner      # the plain backbone again, for decoding and saving
    return model.cpu(), metrics


def _silent(message: str) -> None:
    pass


@torch.no_grad()
def evaluate_value_model(model, rollouts: Rollouts, pad_id: int, prefix_lengths: Sequence[int],
                         device, batch_size: int = 64) -> dict[str, float]:
    """How well V(prefix) predicts the reward the completion finally got, at several prefix lengths.

    corr_prefix_j: Pearson correlation over held-out rollouts between u_j (the value after j
    completion tokens) and the final reward; mse_mc: mean squared error to the final reward
    over all positions (the Monte-Carlo target).
    """
    per_row: list[np.ndarray] = []
    for start in range(0, len(rollouts), batch_size):
        index = list(range(start, min(start + batch_size, len(rollouts))))
        ids, attention, actions, _ = (t.to(device) for t in make_batch(rollouts, index, pad_id))
        with autocast_for(device):
            values = model.path_values(ids, attention, actions).float()
        for row in range(len(index)):
            per_row.append(values[row][actions[row].bool()].cpu().numpy())
    rewards = np.asarray(rollouts.rewards, dtype=np.float64)
    out: dict[str, float] = {}
    for j in list(prefix_lengths) + ["final"]:
        rows = [i for i, v in enumerate(per_row) if j == "final" or len(v) >= j]
        if len(rows) < 3:
            continue
        u = np.array([per_row[i][-1] if j == "final" else per_row[i][j - 1] for i in rows])
        r = rewards[rows]
        out[f"corr_prefix_{j}"] = float(np.corrcoef(u, r)[0, 1]) if u.std() > 0 and r.std() > 0 else 0.0
    squared = np.concatenate([(v - rewards[i]) ** 2 for i, v in enumerate(per_row)])
    out["eval_mse_mc"] = float(squared.mean())
    out["eval_reward_std"] = float(rewards.std())
    return out
