"""How wrong is each value model? Its Q(s, a) against a Monte-Carlo estimate from pi0 itself.

Correlation with one realized reward cannot tell a good value model from a bad one: the reward
of one sample is the value plus a lot of noise. Here the ground truth is estimated directly:

- states: for each of the first `n_prompts` held-out prompts, one seeded pi0 completion, cut
  after L tokens for each L in `prefix_lengths` (prompt + first L completion tokens); a
  completion shorter than L gives no state for that L;
- candidates: pi0's top `n_candidates` next tokens at each state (one forward of the base model);
- ground truth: `n_continuations` pi0 continuations of s·a for each candidate a, each scored as a
  whole text (prompt + completion) by the learned reward model and standardized with the value
  model's own reward_stats, the units of its values. The MC mean is mean R, the MC soft value at
  beta is (1/beta)·log mean exp(beta·R), and the standard error of the MC mean is the noise floor:
  the mse an exact value model would still show, and the Spearman it would get against these
  noisy targets is `spearman_ceiling`. A model with calibrated bins is also measured on
  the target its calibrated decoder steers by, `calibrated`: the MC mean of the normal scores
  z = Phi^-1(F(R)) of the continuations' rewards, through that model's own calibration map.
  Choosing EOS ends the completion, so its continuation is empty and its value is known exactly.

The completion length budget is `max_new_tokens` in all, as in the rollouts the value models
were trained on: s·a has L + 1 completion tokens and its continuations at most
max_new_tokens - L - 1 more. pi0 is sampled at temperature 1.

Continuations are sampled from token ids, not from decoded text: a decoded prefix re-encoded
need not give the same ids (a top-k candidate is not always the tokenizer's own segmentation).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from models.lm.sampling import CachedLM, SamplingConfig, encode_prompts, join_prompt_completion, left_pad, sample
from models.progress import progress_bar
from models.value.value_model import ValueModel
from models.value.value_store import saved_value_models

log = logging.getLogger(__name__)

Scorer = Callable[[Sequence[str], Sequence[str]], list]


@dataclass
class ValueErrorConfig:
    n_prompts: int = 8                          # first n held-out prompts
    prefix_lengths: tuple[int, ...] = (0, 4)    # completion tokens in each state's prefix
    n_candidates: int = 8                       # pi0's top-k next tokens scored at each state
    n_continuations: int = 32                   # MC samples per (state, candidate)
    betas: tuple[float, ...] = (2.0, 8.0)       # soft-value targets
    max_new_tokens: int = 80                    # completion budget, as in the rollouts
    seed: int = 0
    batch_size: int = 256                       # rows per sampling / value-model batch


@dataclass
class State:
    """A prompt plus the first `prefix_len` tokens of one pi0 completion."""

    state_id: int
    prompt_id: str
    prompt: str
    prompt_ids: list[int]
    completion_prefix: list[int]
    completion_len: int         # tokens of the whole completion the state was cut from

    @property
    def prefix_len(self) -> int:
        return len(self.completion_prefix)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_prefix


@dataclass
class ScoredModel:
    """A value model to measure: anything with start(ids, mask) and candidate_q(state, candidates,
    beta); `is_distributional` says whether beta changes its estimate (ValueModel has it)."""

    name: str
    model: object
    attribute: str
    parameterization: str
    reward_stats: Mapping[str, float] = field(default_factory=lambda: {"mean": 0.0, "std": 1.0})


CALIBRATED_TARGET = "calibrated"


def calibration_map(model):
    """The support whose map gives a model's calibrated units, or None (no calibrated bins)."""
    support = getattr(model, "support", None)
    return support if support is not None and support.calibrated else None


def soft_target(beta: float) -> str:
    return f"soft_beta_{float(beta)}"


def check_config(config: ValueErrorConfig) -> None:
    if config.n_continuations < 2:
        raise ValueError(f"n_continuations must be >= 2 to estimate the Monte-Carlo standard error, "
                         f"got {config.n_continuations}")
    if config.n_candidates < 2:
        raise ValueError(f"n_candidates must be >= 2 to rank candidates, got {config.n_candidates}")
    if config.n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {config.n_prompts}")
    if not config.prefix_lengths or min(config.prefix_lengths) < 0:
        raise ValueError(f"prefix_lengths must be non-empty and >= 0, got {list(config.prefix_lengths)}")
    if any(b <= 0 for b in config.betas):
        raise ValueError(f"betas must be > 0 (the soft value at beta -> 0 is the mean), got {list(config.betas)}")
    if config.max_new_tokens < 1 or config.batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {config.max_new_tokens}, "
                         f"{config.batch_size}")


# ---------------------------------------------------------------------------------------------
# States, candidates and Monte-Carlo continuations


def draw_states(base, tokenizer, prompts: pd.DataFrame, config: ValueErrorConfig, device="cpu") -> list[State]:
    """One seeded pi0 completion per prompt (columns prompt_id, prompt; the first n_prompts),
    cut after each prefix length that leaves an action within the completion budget."""
    prompts = prompts.head(config.n_prompts)
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=1.0, seed=config.seed,
                              batch_size=config.batch_size)
    gen = sample(base, tokenizer, prompts.prompt.tolist(), sampling, device=device)
    prompt_ids = encode_prompts(tokenizer, prompts.prompt.tolist())
    states: list[State] = []
    for pid, prompt, ids, completion in zip(prompts.prompt_id, prompts.prompt, prompt_ids, gen.completion_ids):
        for length in sorted(set(config.prefix_lengths)):
            # The completion must reach L tokens, and the state must leave room for one more token.
            if length > len(completion) or length >= config.max_new_tokens:
                continue
            prefix = list(completion[:length])
            if prefix and prefix[-1] == tokenizer.eos_token_id:   # a finished sequence is not a state
                continue
            states.append(State(len(states), str(pid), prompt, list(ids), prefix, len(completion)))
    return states


@torch.no_grad()
def top_candidates(base, states: Sequence[State], n: int, pad_id: int, batch_size: int,
                   device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """pi0's top-n next tokens at each state and their log-probabilities: two (S, n) tensors."""
    tokens, logprobs = [], []
    for start in range(0, len(states), batch_size):
        ids, mask = left_pad([s.ids for s in states[start:start + batch_size]], pad_id)
        logits = CachedLM(base, ids.to(device), mask.to(device)).last_hidden_logits.float()
        top = torch.log_softmax(logits, -1).topk(min(n, logits.shape[-1]), dim=-1)
        tokens.append(top.indices.cpu())
        logprobs.append(top.values.cpu())
    return torch.cat(tokens), torch.cat(logprobs)


@torch.no_grad()
def sample_from_ids(base, rows: Sequence[list[int]], budgets: Sequence[int], eos_id: int, pad_id: int,
                    generator: torch.Generator, device="cpu") -> list[list[int]]:
    """One pi0 continuation (temperature 1, EOS excluded) per id prefix, at most budgets[i]
    tokens each, all rows in one batch: the loop of models.lm.sampling without steering."""
    ids, mask = left_pad(list(rows), pad_id)
    lm = CachedLM(base, ids.to(device), mask.to(device))
    budget = torch.tensor(list(budgets), dtype=torch.long, device=device)
    lengths = budget.clone()
    done = budget <= 0
    out = torch.full((len(rows), max(max(budgets), 1)), pad_id, dtype=torch.long, device=device)
    logits = lm.last_hidden_logits
    for step in range(int(budget.max())):
        token = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out[:, step] = token
        stopped = (~done) & (token == eos_id)
        lengths = torch.where(stopped, torch.full_like(lengths, step), lengths)
        done = done | stopped | (step + 1 >= budget)
        if bool(done.all()):
            break
        logits = lm.step(torch.where(done, torch.full_like(token, eos_id), token))
    return [out[i, :int(lengths[i])].tolist() for i in range(len(rows))]


def continuation_texts(base, tokenizer, states: Sequence[State], candidates: torch.Tensor,
                       config: ValueErrorConfig, device="cpu") -> list[list[str]]:
    """For each (state, candidate), state-major: the n_continuations completion texts of s·a·y,
    y a pi0 continuation. EOS, or no budget left, gives n identical texts without sampling."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    m = config.n_continuations
    jobs, rows, budgets = [], [], []          # (pair index, completion ids so far), per sampled row
    texts: list[list[str]] = []
    for i, state in enumerate(states):
        budget = config.max_new_tokens - state.prefix_len - 1
        for a in candidates[i].tolist():
            pair = len(texts)
            if a == eos or budget == 0:
                completion = state.completion_prefix + ([] if a == eos else [a])
                texts.append([tokenizer.decode(completion, skip_special_tokens=True)] * m)
                continue
            texts.append([])
            for _ in range(m):
                jobs.append((pair, state.completion_prefix + [a]))
                rows.append(state.ids + [a])
                budgets.append(budget)
    generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    batches = range(0, len(rows), config.batch_size)
    for start in progress_bar(batches, "value error continuations", unit="batch"):
        stop = start + config.batch_size
        continuations = sample_from_ids(base, rows[start:stop], budgets[start:stop], eos, pad, generator, device)
        for (pair, completion), tail in zip(jobs[start:stop], continuations):
            texts[pair].append(tokenizer.decode(completion + tail, skip_special_tokens=True))
        log.info(f"value_error: sampled {min(stop, len(rows))}/{len(rows)} continuations")
    return texts


def score_rewards(scorer: Scorer, states: Sequence[State], n_candidates: int,
                  texts: Sequence[list[str]]) -> np.ndarray:
    """Learned rewards of every continuation: (pairs, n_continuations), in continuation_texts' order."""
    prompts = [states[pair // n_candidates].prompt for pair, group in enumerate(texts) for _ in group]
    flat = [t for group in texts for t in group]
    return np.asarray(scorer(prompts, flat), dtype=np.float64).reshape(len(texts), -1)


def mc_statistics(rewards: np.ndarray, betas: Sequence[float]) -> dict[str, np.ndarray]:
    """Monte-Carlo targets from standardized rewards (pairs, M): the mean with its standard
    error, and per beta the soft value (1/beta)·log mean exp(beta·R) with its delta-method
    standard error std(w) / (sqrt(M)·mean(w)·beta), w = exp(beta·R). At large beta and small M
    both the soft value and its standard error are biased low (the largest draw dominates)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    m = r.shape[1]
    out = {"mc_mean": r.mean(1).numpy(), "mc_se_mean": (r.std(1) / math.sqrt(m)).numpy()}
    for beta in betas:
        name = soft_target(beta)
        out[f"mc_{name}"] = ((torch.logsumexp(beta * r, 1) - math.log(m)) / beta).numpy()
        w = torch.exp(beta * r - (beta * r).max(1, keepdim=True).values)     # scaled: same ratio
        out[f"mc_se_{name}"] = (w.std(1) / (math.sqrt(m) * w.mean(1) * beta)).numpy()
    return out


# ---------------------------------------------------------------------------------------------
# Value-model estimates and metrics


@torch.no_grad()
def model_estimates(scored: ScoredModel, states: Sequence[State], candidates: torch.Tensor,
                    betas: Sequence[float], pad_id: int, batch_size: int, device="cpu") -> dict[str, np.ndarray]:
    """Q(s, a) for every (state, candidate), flattened state-major: "est_mean" and per beta
    "est_soft_beta_<b>" (the mean again for models whose estimate does not depend on beta), and
    "est_calibrated" (the mean normal score) for models with calibrated bins."""
    distributional = bool(getattr(scored.model, "is_distributional", False))
    calibrated = calibration_map(scored.model) is not None
    names = ["mean", *[soft_target(b) for b in betas], *([CALIBRATED_TARGET] if calibrated else [])]
    parts: dict[str, list[torch.Tensor]] = {f"est_{t}": [] for t in names}
    for start in range(0, len(states), batch_size):
        ids, mask = left_pad([s.ids for s in states[start:start + batch_size]], pad_id)
        state = scored.model.start(ids.to(device), mask.to(device))
        chunk = candidates[start:start + batch_size].to(device)
        mean = scored.model.candidate_q(state, chunk, beta=None).float().cpu()
        parts["est_mean"].append(mean)
        for beta in betas:
            soft = scored.model.candidate_q(state, chunk, beta=beta).float().cpu() if distributional else mean
            parts[f"est_{soft_target(beta)}"].append(soft)
        if calibrated:
            parts[f"est_{CALIBRATED_TARGET}"].append(scored.model.candidate_q(state, chunk, calibrated=True).float().cpu())
    return {k: torch.cat(v).flatten().numpy().astype(np.float64) for k, v in parts.items()}


def rank_correlation(x: pd.Series, y: pd.Series) -> float:
    """Spearman: Pearson correlation of the ranks (ties get their average rank). An estimate
    that is the same for every candidate ranks nothing: 0."""
    if x.nunique() <= 1 or y.nunique() <= 1:
        return 0.0
    return float(np.corrcoef(x.rank(), y.rank())[0, 1])


def mean_spearman(pairs: pd.DataFrame, truth: str, estimate: str) -> tuple[float, int]:
    """Mean over states of the rank correlation across candidates; states whose MC values are
    all equal have no order to recover and are skipped. Returns (mean, states used)."""
    values = [rank_correlation(g[truth], g[estimate]) for _, g in pairs.groupby("state_id")
              if g[truth].nunique() > 1]
    return (float(np.mean(values)) if values else float("nan")), len(values)


def spearman_ceiling(pairs: pd.DataFrame, truth: str, se: str, draws: int = 200, seed: int = 0) -> float:
    """The mean per-state Spearman an exact value model would get against these MC targets: the
    ceiling that MC noise puts on `spearman`. Within a state the MC values spread across
    candidates by the true spread plus noise; the pooled share of that spread which is not noise,
    reliability = 1 - mean(se^2) / mean(within-state variance), gives the true values as the MC
    values shrunk toward their state's mean by sqrt(reliability). Those are re-measured `draws`
    times with fresh noise of each pair's own standard error (seeded) and ranked against
    themselves as mean_spearman ranks a model. 1 for noiseless targets; 0 where the spread is all
    noise. States must have the same number of candidates (value_error's do)."""
    frame = pairs[["state_id", truth, se]].dropna()
    sizes = frame.groupby("state_id").size()
    if frame.empty or sizes.nunique() != 1 or sizes.iloc[0] < 2:
        return float("nan")
    frame = frame.sort_values("state_id", kind="stable")
    values = frame[truth].to_numpy().reshape(len(sizes), -1)                    # (states, candidates)
    noise_sd = frame[se].to_numpy().reshape(values.shape)
    spread = values.var(axis=1, ddof=1).mean()
    reliability = 0.0 if spread <= 0 else max(0.0, 1.0 - float((noise_sd ** 2).mean()) / spread)
    centre = values.mean(axis=1, keepdims=True)
    exact = centre + math.sqrt(reliability) * (values - centre)
    rng = np.random.default_rng(seed)
    measured = exact + rng.normal(size=(draws, *exact.shape)) * noise_sd       # (draws, states, candidates)
    flat = measured.reshape(-1, exact.shape[1])
    r_measured = pd.DataFrame(flat).rank(axis=1).to_numpy().reshape(measured.shape)
    r_exact = pd.DataFrame(exact).rank(axis=1).to_numpy()[None]
    dm = r_measured - r_measured.mean(-1, keepdims=True)
    de = r_exact - r_exact.mean(-1, keepdims=True)
    denominator = np.sqrt((dm ** 2).sum(-1) * (de ** 2).sum(-1))
    # rank_correlation: an exact value that is the same for every candidate ranks nothing (0);
    # mean_spearman: a state whose measured values are all equal is skipped.
    rho = np.where(denominator > 0, (dm * de).sum(-1) / np.where(denominator > 0, denominator, 1.0), 0.0)
    ranked = np.ptp(measured, axis=-1) > 0                                      # (draws, states)
    return float(rho[ranked].mean()) if ranked.any() else float("nan")


def error_metrics(pairs: pd.DataFrame, betas: Sequence[float]) -> pd.DataFrame:
    """One row per (model, target): mse, mean per-state Spearman, counts, the MC noise floor, and
    the Spearman an exact model would get (spearman_ceiling)."""
    rows = []
    for (name, parameterization, attribute), frame in pairs.groupby(["model", "parameterization", "attribute"],
                                                                    sort=False):
        for target in ["mean", *[soft_target(b) for b in betas], CALIBRATED_TARGET]:
            truth, estimate = f"mc_{target}", f"est_{target}"
            if truth not in frame or frame[truth].isna().all():     # calibrated: only models that have it
                continue
            spearman, ranked = mean_spearman(frame, truth, estimate)
            rows.append({
                "model": name, "parameterization": parameterization, "attribute": attribute, "target": target,
                "mse": float(((frame[estimate] - frame[truth]) ** 2).mean()),
                "spearman": spearman,
                "spearman_ceiling": spearman_ceiling(frame, truth, f"mc_se_{target}"),
                "n_states": int(frame.state_id.nunique()),
                "n_pairs": len(frame),
                "n_ranked_states": ranked,
                "mc_noise_mse": float((frame[f"mc_se_{target}"] ** 2).mean()),
                # The mse of the best constant guess: a model must beat this to know anything.
                "target_var": float(frame[truth].var(ddof=0)),
            })
    return pd.DataFrame(rows)


def state_frame(tokenizer, states: Sequence[State], candidates: torch.Tensor, logprobs: torch.Tensor) -> pd.DataFrame:
    """One row per (state, candidate), state-major: what was measured, readable."""
    rows = []
    for i, s in enumerate(states):
        prefix_text = join_prompt_completion(s.prompt, tokenizer.decode(s.completion_prefix, skip_special_tokens=True))
        for rank, (a, lp) in enumerate(zip(candidates[i].tolist(), logprobs[i].tolist())):
            rows.append({"state_id": s.state_id, "prompt_id": s.prompt_id, "prompt": s.prompt,
                         "prefix_len": s.prefix_len, "completion_len": s.completion_len,
                         "prefix_text": prefix_text, "prefix_ids": s.ids, "candidate_rank": rank,
                         "candidate_id": a, "candidate_token": tokenizer.decode([a]),
                         "is_eos": a == tokenizer.eos_token_id, "base_logprob": lp})
    return pd.DataFrame(rows)


def evaluate_value_error(base, tokenizer, prompts: pd.DataFrame, scorers: Mapping[str, Scorer],
                         models: Sequence[ScoredModel], config: ValueErrorConfig,
                         device="cpu") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics, pairs): metrics from error_metrics; pairs one row per (state, candidate, model)
    with the state, the candidate, the MC targets (mc_*, mc_se_*) and the estimates (est_*)."""
    check_config(config)
    missing = sorted({m.attribute for m in models} - set(scorers))
    if missing:
        raise ValueError(f"no learned reward model for attribute(s) {', '.join(missing)}; "
                         f"have {', '.join(sorted(scorers)) or 'none'}")
    states = draw_states(base, tokenizer, prompts, config, device)
    if not states:
        raise ValueError(f"no states: every completion is shorter than the prefix lengths "
                         f"{list(config.prefix_lengths)} (or max_new_tokens {config.max_new_tokens} leaves no room)")
    pad = tokenizer.pad_token_id
    candidates, logprobs = top_candidates(base, states, config.n_candidates, pad, config.batch_size, device)
    log.info(f"value_error: {len(states)} states x {candidates.shape[1]} candidates x "
             f"{config.n_continuations} continuations")
    texts = continuation_texts(base, tokenizer, states, candidates, config, device)
    raw = {attribute: score_rewards(scorers[attribute], states, candidates.shape[1], texts)
           for attribute in sorted({m.attribute for m in models})}
    described = state_frame(tokenizer, states, candidates, logprobs)
    frames = []
    for scored in models:
        stats = scored.reward_stats
        standardized = (raw[scored.attribute] - stats["mean"]) / (stats["std"] or 1.0)
        frame = described.assign(model=scored.name, parameterization=scored.parameterization,
                                 attribute=scored.attribute)
        columns = {**mc_statistics(standardized, config.betas),
                   **model_estimates(scored, states, candidates, config.betas, pad, config.batch_size, device)}
        support = calibration_map(scored.model)
        if support is not None:
            z = support.normal_scores_of(standardized)                              # (pairs, M)
            columns[f"mc_{CALIBRATED_TARGET}"] = z.mean(1)
            columns[f"mc_se_{CALIBRATED_TARGET}"] = z.std(1, ddof=1) / math.sqrt(z.shape[1])
        frames.append(frame.assign(**columns))
    pairs = pd.concat(frames, ignore_index=True)
    return error_metrics(pairs, config.betas), pairs


def load_scored_models(root: str | Path, device="cpu") -> list[ScoredModel]:
    """Every value model under a value_models folder, with the attribute, parameterization and
    reward_stats from its vas_value.json; named by its folder. Hidden folders are skipped."""
    return [ScoredModel(folder.name, ValueModel.load(folder, device=device), meta["attribute"],
                        meta["parameterization"], meta["reward_stats"]) for folder, meta in saved_value_models(root)]


def markdown_table(metrics: pd.DataFrame) -> str:
    """The metrics as a markdown table, for the report and the Dagster UI."""
    columns = ["model", "target", "mse", "mc_noise_mse", "target_var", "spearman", "spearman_ceiling", "n_states",
               "n_pairs"]
    # value_error.parquet written before spearman_ceiling existed has no such column
    return metrics[[c for c in columns if c in metrics]].to_markdown(index=False, floatfmt=".3f")
