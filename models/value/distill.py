"""A per-token value head distilled from a V(s·a) value model: the ranking of a model that reads
text, at the decode cost of a head on the frozen base model's hidden states.

A `scalar` value model (on the real profile, the reward model's body fine-tuned on every prefix)
scores each of pi0's top-k candidates with a forward of its own body: k + 1 value forwards per
decoded token. A factorized `qhead` on the frozen base's own body (Q(s, a) = M(h_s) · P·e_a,
models/value/value_model.py) reads the hidden state the base model's forward already computed, so
decoding with it costs about one base forward per token.

The student is fitted to the teacher's Q(s, a) for every candidate the decoder steers (pi0's
top-k that pass min_p) at every state of pi0's rollouts: dense targets, k per state, rather than
a TD target for the sampled token alone. Both are centred over those candidates, as ValueGuidance
centres them: a per-state offset never steers, so it is not fitted. The teacher is run exactly as
the decoder runs it (teacher-forced along each rollout, its prefix cache, candidate_q), so the
student learns the values VAS with the teacher would use.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from models.lm.sampling import CachedLM, left_pad
from models.lm.train_utils import split_groups, warmup_lr
from models.progress import progress_bar
from models.value.value_model import ValueModel, centred, steered_candidates

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    top_k: int = 20               # pi0's candidates per state (the evaluation's top_k)
    min_p: float = 0.01           # of those, the ones the decoder steers (VASConfig.min_p) are fitted
    rank: int = 64                # of the student's factorized head
    train_steps: int = 2000
    batch_size: int = 256         # states per step
    learning_rate: float = 3e-3
    warmup_steps: int = 100       # then a linear decay to 0 at train_steps
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_rollouts: int = 0         # rollouts whose states are collected (0: all of them)
    eval_fraction: float = 0.1    # held-out rollouts, split by prompt as value training splits them
    seed: int = 0
    collect_batch_size: int = 64  # rollouts teacher-forced together


@dataclass
class TeacherTargets:
    """The teacher's view of N states: what the student reads and what it is fitted to."""

    hidden: torch.Tensor          # (N, H) the base model's last hidden state at each state
    candidates: torch.Tensor      # (N, k) pi0's top-k token ids there
    steered: torch.Tensor         # (N, k) bool: the candidates the decoder steers (min_p)
    values: torch.Tensor          # (N, k) the teacher's Q(s, a), float32
    groups: list[str]             # each state's prompt: the held-out split never shares one

    def __len__(self) -> int:
        return len(self.groups)

    def subset(self, index: Sequence[int]) -> "TeacherTargets":
        rows = torch.as_tensor(list(index), dtype=torch.long)
        return TeacherTargets(self.hidden[rows], self.candidates[rows], self.steered[rows], self.values[rows],
                              [self.groups[i] for i in index])


@torch.no_grad()
def collect_targets(base, teacher: ValueModel, rollouts, config: DistillConfig, pad_id: int,
                    progress: Callable[[str], None] = log.info) -> TeacherTargets:
    """Teacher-force base and teacher along each rollout (models.value.value_training.Rollouts): at the
    state before each action token, pi0's top-k, which of them min_p steers, and the teacher's
    Q(s, a) of each, with the base model's hidden state there."""
    index = list(range(len(rollouts)))
    if config.max_rollouts:
        index = index[: config.max_rollouts]
    groups_of = rollouts.groups or [str(i) for i in range(len(rollouts))]
    parts: dict[str, list] = {"hidden": [], "candidates": [], "steered": [], "values": []}
    groups: list[str] = []
    started = time.perf_counter()
    n_batches = -(-len(index) // config.collect_batch_size)
    batches = range(0, len(index), config.collect_batch_size)
    for b, start in enumerate(progress_bar(batches, "distillation targets", unit="batch")):
        rows = index[start : start + config.collect_batch_size]
        ids, mask = left_pad([rollouts.prompt_ids[i] for i in rows], pad_id)
        ids, mask = ids.to(teacher.device), mask.to(teacher.device)
        actions = [rollouts.action_ids[i] for i in rows]
        lm = CachedLM(base, ids, mask, keep_hidden=True)
        state = teacher.start(ids, mask)
        for t in range(max(len(a) for a in actions)):
            live = torch.tensor([t < len(a) for a in actions], device=ids.device)              # (B,)
            top_logits, top = lm.last_hidden_logits.float().topk(config.top_k, dim=-1)        # (B, k)
            on = steered_candidates(top_logits, config.min_p)
            on = torch.ones_like(top, dtype=torch.bool) if on is None else on
            q = teacher.candidate_q(state, top).float()                                      # (B, k)
            parts["hidden"].append(lm.last_hidden[live].float().cpu())
            parts["candidates"].append(top[live].cpu())
            parts["steered"].append(on[live].cpu())
            parts["values"].append(q[live].cpu())
            groups += [groups_of[rows[r]] for r in range(len(rows)) if t < len(actions[r])]
            # Finished rows are fed padding: their later states are never recorded.
            fed = torch.tensor([a[t] if t < len(a) else pad_id for a in actions], device=ids.device)
            lm.step(fed)
            teacher.advance(state, fed)
        if (b + 1) % max(1, n_batches // 10) == 0 or b + 1 == n_batches:
            progress(f"distillation targets: {start + len(rows)}/{len(index)} rollouts, {len(groups)} states, "
                     f"{time.perf_counter() - started:.0f} s")
    return TeacherTargets(*(torch.cat(parts[k]) for k in ("hidden", "candidates", "steered", "values")), groups)


def student_values(student: ValueModel, hidden: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(N, k) the student's Q(s, a) of candidates (N, k) at states of hidden states (N, H)."""
    return student._per_token(hidden[:, None, :].to(student.device), candidates.to(student.device))


def distill_loss(student: ValueModel, targets: TeacherTargets) -> torch.Tensor:
    """Mean squared error of the centred student values to the centred teacher values, over the
    steered candidates of every state (a state with one steered candidate has nothing to rank)."""
    on = targets.steered.to(student.device)
    error = centred(student_values(student, targets.hidden, targets.candidates), on) \
        - centred(targets.values.to(student.device), on)
    return (error.pow(2) * on).sum() / on.sum().clamp(min=1)


def masked_spearman(x: torch.Tensor, y: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """(N,) rank correlation of x and y (N, k) over each row's `on` candidates (ties broken by
    position: the values here are floats of different tokens); NaN where fewer than 3 are on."""
    def ranks(v):                       # off candidates rank last, so the on ones hold ranks 0..n-1
        return v.masked_fill(~on, float("inf")).argsort(-1).argsort(-1).double()
    n = on.sum(-1, keepdim=True).double()
    rx, ry = (torch.where(on, ranks(v) - (n - 1) / 2, 0.0) for v in (x, y))
    cov = (rx * ry).sum(-1)
    rho = cov / ((rx.pow(2).sum(-1) * ry.pow(2).sum(-1)).sqrt().clamp(min=1e-12))
    return torch.where(n.squeeze(-1) >= 3, rho, float("nan"))


def fit_quality(student: ValueModel, targets: TeacherTargets) -> dict[str, float]:
    """How well the student reproduces the teacher on these states: the mean Spearman over each
    state's steered candidates (states with at least 3), and the centred values' R^2."""
    with torch.no_grad():
        mine = student_values(student, targets.hidden, targets.candidates).cpu()
    on = targets.steered
    truth, fit = centred(targets.values, on), centred(mine, on)
    spread = float((truth.pow(2) * on).sum())
    r2 = 1.0 - float(((fit - truth).pow(2) * on).sum()) / spread if spread > 0 else float("nan")
    rho = masked_spearman(targets.values, mine, on)
    rho = rho[~rho.isnan()]
    return {"spearman": float(rho.mean()) if len(rho) else float("nan"), "r2": r2, "n_states": len(targets)}


def fit_student(base, targets: TeacherTargets, config: DistillConfig,
                progress: Callable[[str], None] = log.info) -> tuple[ValueModel, dict]:
    """(student, metrics): a factorized qhead on base's body (shared, frozen: saved by reference),
    fitted to the teacher's centred values on the states of the training rollouts, checked on the
    held-out rollouts' states. Warmup, then a linear decay to 0, and clipped gradients: at a constant
    rate Adam drifts off after a few thousand steps (measured: held-out R^2 from 0.31 to -22)."""
    train_idx, eval_idx = split_groups(targets.groups, config.eval_fraction, config.seed)
    if not train_idx:
        raise ValueError("no distillation states left after the held-out split; lower eval_fraction")
    train, held = targets.subset(train_idx), targets.subset(eval_idx)
    torch.manual_seed(config.seed)
    student = ValueModel(base.base_model, "qhead", rank=config.rank, token_factors="embedding")
    student = student.to(targets.hidden.device)
    student.frozen_backbone = True
    frozen = [p for p in student.backbone.parameters() if p.requires_grad]
    for p in frozen:                 # the base's embeddings feed the token factors: no gradient for them
        p.requires_grad_(False)
    trainable = [p for name, p in student.named_parameters() if not name.startswith("backbone.")]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    progress(f"distilling a rank-{config.rank} qhead: {len(train)} train / {len(held)} held-out states, "
             f"{config.train_steps} steps")
    losses, log_every = [], max(1, config.train_steps // 10)
    warmup = min(config.warmup_steps, config.train_steps // 2)
    started = time.perf_counter()
    try:
        for step in progress_bar(range(config.train_steps), "distillation", unit="step"):
            for group in optimizer.param_groups:
                group["lr"] = warmup_lr(step, config.learning_rate, warmup, config.train_steps)
            rows = torch.randint(len(train), (min(config.batch_size, len(train)),), generator=generator)
            loss = distill_loss(student, train.subset(rows.tolist()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == config.train_steps:
                progress(f"distill step {step + 1}/{config.train_steps}: loss {np.mean(losses[-log_every:]):.4f}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    student.eval()
    metrics = {"distill_loss": float(np.mean(losses[-50:])), "loss_curve": losses,
               "fit_seconds": time.perf_counter() - started,
               "teacher_value_sd": float(centred(train.values, train.steered)[train.steered].std()),
               **{f"train_{k}": v for k, v in fit_quality(student, train).items()}}
    if len(held):
        metrics.update({f"heldout_{k}": v for k, v in fit_quality(student, held).items()})
    progress(f"distilled head: Spearman to the teacher {metrics['train_spearman']:.2f} on training states"
             + (f", {metrics['heldout_spearman']:.2f} held out" if len(held) else ""))
    return student, metrics


def distill_head(base, teacher: ValueModel, rollouts, config: DistillConfig, pad_id: int,
                 progress: Callable[[str], None] = log.info) -> tuple[ValueModel, dict]:
    """collect_targets, then fit_student: (student on the teacher's device, metrics)."""
    started = time.perf_counter()
    targets = collect_targets(base, teacher, rollouts, config, pad_id, progress)
    student, metrics = fit_student(base, targets, config, progress)
    return student, {"collect_seconds": time.perf_counter() - started - metrics["fit_seconds"], **metrics}
