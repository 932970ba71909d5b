"""Evaluation: base sampling, Best-of-N, VAS over a beta sweep, VAS + rerank and a composition grid.

Every method samples the same held-out prompts with the same seed. Best-of-N draws its N
candidates as N seeded base samplings (candidate 0 uses the shared seed, so Best-of-1 is base
sampling token for token) and keeps the one the learned reward scores highest. VAS + rerank does
the same with N VAS samples: its cost is N VAS samples, and its KL to pi0 is estimated as the
selected samples' mean log pi_vas(y)/pi0(y) plus the Best-of-N term log N - (N-1)/N (the chain
rule KL(rr||pi0) = E_rr[log rr/pi_vas] + E_rr[log pi_vas/pi0], the first term bounded by it).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from models.decoding.vas import VASConfig, vas_sample
from models.evaluation.dpo import PolicySteering
from models.evaluation.study import best_eligible, mean_ci95
from models.evaluation.tilt import tilt_curve
from models.lm.sampling import SamplingConfig, encode_prompts, sample
from models.rewards.rewards import score_gold
from models.value.value_model import DISTRIBUTIONAL, PER_TOKEN_HEADS

log = logging.getLogger(__name__)


# Seeds of successive Best-of-N / rerank candidates are this far apart (a prime): with seed + k, the
# pools of seeds 0 and 1 shared 127 of 128 candidates and a seed study's Best-of-N barely moved.
CANDIDATE_SEED_STRIDE = 10_007


@dataclass
class EvalConfig:
    samples_per_prompt: int = 1
    bon_ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    bon_attribute: str = "positivity"            # Best-of-N picks by this learned reward
    steer_attribute: str = "positivity"          # the beta sweep steers with this value model
    betas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    # Distributional models with calibrated bins also decode by the mean normal score of the reward
    # (VASConfig.calibrated) at these betas; beta is then in standard deviations of pi0's quantiles.
    calibrated_betas: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    # The exact tilt pi0·exp(beta·R)/Z estimated on Best-of-N's pool (models/evaluation/tilt.py), at these betas
    # per standard deviation of the pool's learned reward: the curve exact values would reach.
    tilt_betas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
    parameterizations: tuple[str, ...] = ("distributional_qhead", "scalar")   # distributional ones run soft and mean
    compose_weights: tuple[float, ...] = (0.0, 2.0, 4.0)   # grid over positivity x conciseness
    compose_parameterization: str = "distributional_qhead"
    # VAS + rerank: N VAS samples at each beta, the best by the learned reward (empty: skipped).
    rerank_parameterization: str = "distributional_qhead"
    rerank_betas: tuple[float, ...] = (16.0,)
    rerank_ns: tuple[int, ...] = (2, 4, 8)
    # ARGS (models/decoding/reward_guidance.py): the steered attribute's reward model scores prefix + each
    # top-k candidate at every step, at these weights per sd of the reward over base samples (empty: skipped).
    args_weights: tuple[float, ...] = (2.0, 8.0)
    top_k: int = VASConfig.top_k
    min_p: float = VASConfig.min_p
    max_new_tokens: int = 80
    temperature: float = 1.0
    batch_size: int = 128
    seed: int = 0


@dataclass
class MethodRun:
    method: str
    params: dict
    frame: pd.DataFrame                 # one row per sample
    seconds: float                      # wall time of decoding (and reranking) for the whole run
    forwards_per_sample: float          # base-model-forward equivalents per accepted sample
    extra: dict = field(default_factory=dict)


def bon_kl(n: int) -> float:
    """The standard analytic KL of Best-of-N to the base policy: log N - (N - 1) / N."""
    return math.log(n) - (n - 1) / n


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of the texts (word level)."""
    grams, total = set(), 0
    for text in texts:
        words = text.split()
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i : i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def repeats_ngram(text: str, n: int = 4) -> bool:
    """Whether some word n-gram occurs at least twice within the text: the loop a lexicon pays for
    ("everything you wish you did and everything you wish you did")."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def repeat_share(texts: Sequence[str], n: int = 4) -> float:
    """Share of texts that repeat a word n-gram within themselves (repeats_ngram); 0 for no texts."""
    texts = list(texts)
    return sum(repeats_ngram(t, n) for t in texts) / len(texts) if texts else 0.0


def _frame(prompts: pd.DataFrame, gen, method: str, params: dict) -> pd.DataFrame:
    return pd.DataFrame({
        "method": method,
        "params": json.dumps(params, sort_keys=True),
        "prompt_id": prompts.prompt_id.to_numpy(),
        "draw": prompts.draw.to_numpy(),
        "prompt": prompts.prompt.to_numpy(),
        "completion": gen.texts,
        "n_tokens": gen.n_tokens,
        "kl_nats": gen.kl_nats,
        "log_ratio": gen.log_ratio or [0.0] * len(gen.texts),
        "finished": gen.finished,
    })


def family_of(method: str, params: dict) -> str:
    """The curve a summary row belongs to: Best-of-N along N, a VAS decoder along beta, VAS +
    rerank at one beta along N."""
    if method == "args":
        return "ARGS"
    if method in ("vas", "vas_rerank"):
        label = f"VAS {params['parameterization']}"
        if params.get("calibrated"):
            label += " calibrated"
        elif "soft" in params:
            label += " soft" if params["soft"] else " mean"
        return label + (f" + rerank, beta {params['beta']:g}" if method == "vas_rerank" else "")
    return {"bon": "Best-of-N", "dpo": "DPO"}.get(method, method)


def is_distributional(parameterization: str) -> bool:
    return parameterization in DISTRIBUTIONAL


def forward_params(model: torch.nn.Module, shared_with: torch.nn.Module | None = None) -> int:
    """Parameters a forward of `model` multiplies by, each counted once: all but embedding tables
    (and distributional_qhead's free token factors), which are looked up, not multiplied (a table
    tied to an output layer is that layer's weights and counts), and but those of `shared_with` (the
    base model, whose forward already ran them). A qhead's vocabulary-sized head counts whole,
    although decoding gathers only the k candidates' rows of it."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    skip = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - linear
    # distributional_qhead's free token factors are a table too: decoding gathers the k candidates' rows.
    skip |= {id(m.token_factors) for m in model.modules() if isinstance(getattr(m, "token_factors", None),
                                                                         torch.nn.Parameter)}
    if shared_with is not None:
        skip |= {id(p) for p in shared_with.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def forwards_per_token(value_models: Sequence[torch.nn.Module], base: torch.nn.Module, top_k: int) -> float:
    """Base forward + value forwards per decoded token, in base-model units: a value forward counts
    the parameters it multiplies by (forward_params) against the base's. Scalar-shaped heads score
    the top_k candidates and the chosen token, per-token heads read one forward. A value model's
    parameters that are the base model's own (a head on the frozen base's hidden states, which the
    sampler hands it) cost no second forward."""
    total = forward_params(base)
    cost = 1.0
    for model in value_models:
        calls = 1 if getattr(model, "parameterization", "scalar") in PER_TOKEN_HEADS else top_k + 1
        cost += calls * forward_params(model, shared_with=base) / total
    return cost


class Evaluator:
    """Runs every method on the same prompts; scoring happens once per sample at the end."""

    def __init__(self, base_model, tokenizer, value_models: Mapping[str, Mapping[str, object]],
                 reward_scorers: Mapping[str, Callable], gold_attributes: Sequence[str], prompts: pd.DataFrame,
                 config: EvalConfig, device: str = "cpu", progress: Callable[[str], None] = log.info,
                 dpo_model=None):
        """value_models: parameterization -> attribute -> ValueModel; dpo_model: a fine-tuned copy
        of the base model sharing its tokenizer, sampled as a baseline when given."""
        self.dpo = dpo_model
        self.base, self.tokenizer = base_model, tokenizer
        self.value_models = value_models
        self.scorers = reward_scorers
        self.gold_attributes = list(gold_attributes)
        self.config = config
        self.device = device
        self.progress = progress
        rows = prompts.loc[prompts.index.repeat(config.samples_per_prompt)].reset_index(drop=True)
        rows["draw"] = np.tile(np.arange(config.samples_per_prompt), len(prompts))
        self.prompts = rows
        self.tilt: pd.DataFrame | None = None      # run_best_of_n fills it: the exact tilt's reference rows
        self._prompt_tokens: float | None = None   # mean prompt length in tokens (reward_forwards)

    def sampling(self, candidate: int = 0) -> SamplingConfig:
        """Candidate k (Best-of-N, VAS + rerank) samples with seed + CANDIDATE_SEED_STRIDE·k: candidate 0
        is the method itself, and the pools of two evaluation seeds (a seed study's 0, 1, 2) share
        no candidate, so their Best-of-N results are independent draws."""
        c = self.config
        return SamplingConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                              seed=c.seed + CANDIDATE_SEED_STRIDE * candidate, batch_size=c.batch_size)

    def score(self, frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        for name, scorer in self.scorers.items():
            frame[f"learned_{name}"] = scorer(frame.prompt.tolist(), frame.completion.tolist())
        for name, values in score_gold(frame.completion.tolist(), self.gold_attributes).items():
            frame[f"gold_{name}"] = values
        return frame

    def run_base(self) -> MethodRun:
        start = time.perf_counter()
        gen = sample(self.base, self.tokenizer, self.prompts.prompt.tolist(), self.sampling(), device=self.device)
        seconds = time.perf_counter() - start
        frame = self.score(_frame(self.prompts, gen, "base", {}))
        return MethodRun("base", {}, frame, seconds, float(frame.n_tokens.mean()))

    def run_best_of_n(self) -> list[MethodRun]:
        """One pool of max(N) candidates per prompt draw; Best-of-N keeps the best of the first N."""
        c = self.config
        n_max = max(c.bon_ns)
        pool, seconds = [], []
        for k in range(n_max):
            start = time.perf_counter()
            gen = sample(self.base, self.tokenizer, self.prompts.prompt.tolist(), self.sampling(k), device=self.device)
            seconds.append(time.perf_counter() - start)
            pool.append(_frame(self.prompts, gen, "bon", {}))
            if (k + 1) % max(1, n_max // 8) == 0:
                self.progress(f"Best-of-N pool: {k + 1}/{n_max} candidates per prompt")
        start = time.perf_counter()
        scorer = self.scorers[c.bon_attribute]
        scores = np.stack([np.asarray(scorer(f.prompt.tolist(), f.completion.tolist())) for f in pool])  # (n_max, S)
        rerank_seconds = time.perf_counter() - start
        if n_max >= 2 and c.tilt_betas:
            self.tilt = self.tilt_reference(pool, scores)
        runs = []
        for n in c.bon_ns:
            best = scores[:n].argmax(0)                                                   # (S,)
            frame = pd.concat([pool[b].iloc[[i]] for i, b in enumerate(best)], ignore_index=True)
            frame["params"] = json.dumps({"n": n}, sort_keys=True)
            frame["kl_nats"] = bon_kl(n)
            frame = self.score(frame)
            tokens = float(np.mean([pool[k].n_tokens.mean() for k in range(n)]))
            wall = sum(seconds[:n]) + rerank_seconds * n / n_max
            runs.append(MethodRun("bon", {"n": n}, frame, wall, n * (tokens + self.reward_forwards(scorer, tokens))))
        return runs

    def reward_forwards(self, scorer, completion_tokens: float) -> float:
        """Base-forward equivalents of the reward model scoring one text (prompt + completion of
        completion_tokens): what reranking a candidate costs beside sampling it. 0 for a scorer
        with no model to count (a plain function)."""
        model = getattr(scorer, "model", None)
        if model is None:
            return 0.0
        if self._prompt_tokens is None:
            self._prompt_tokens = float(np.mean([len(r) for r in encode_prompts(self.tokenizer,
                                                                                 self.prompts.prompt.tolist())]))
        return (self._prompt_tokens + completion_tokens) * forward_params(model) / forward_params(self.base)

    def tilt_reference(self, pool: Sequence[pd.DataFrame], scores: np.ndarray) -> pd.DataFrame:
        """The exact tilt by the Best-of-N reward, estimated on the pool (n_max frames of S samples,
        scores (n_max, S)), with every gold reward averaged under it: summary rows of method "tilt"."""
        golds = [score_gold(f.completion.tolist(), self.gold_attributes) for f in pool]
        gold = {f"gold_{a}": np.stack([g[a] for g in golds], axis=1) for a in self.gold_attributes}   # (S, n_max)
        return tilt_curve(scores.T, self.config.tilt_betas, self.config.bon_attribute, gold)

    def vas_forwards_per_token(self, weights: Mapping[str, float], parameterization: str,
                               value_models: Mapping[str, torch.nn.Module] | None = None) -> float:
        """forwards_per_token of the value models these weights run (the saved ones of this
        parameterization unless value_models are given)."""
        models = value_models if value_models is not None else self.value_models[parameterization]
        return forwards_per_token([models[a] for a, w in weights.items() if w], self.base, self.config.top_k)

    def run_vas(self, weights: Mapping[str, float], parameterization: str, method: str, params: dict,
                soft: bool = True, candidate: int = 0, calibrated: bool = False,
                value_models: Mapping[str, torch.nn.Module] | None = None) -> MethodRun:
        """value_models: attribute -> value model, instead of the saved ones of this parameterization."""
        vas_config = VASConfig(top_k=self.config.top_k, min_p=self.config.min_p, soft=soft, calibrated=calibrated)
        models = value_models if value_models is not None else self.value_models[parameterization]
        start = time.perf_counter()
        gen = vas_sample(self.base, self.tokenizer, self.prompts.prompt.tolist(), models,
                         weights, self.sampling(candidate), vas_config=vas_config, device=self.device)
        seconds = time.perf_counter() - start
        frame = self.score(_frame(self.prompts, gen, method, params))
        per_token = self.vas_forwards_per_token(weights, parameterization, models)
        return MethodRun(method, params, frame, seconds, float(frame.n_tokens.mean()) * per_token)

    def run_args(self, base: MethodRun) -> list[MethodRun]:
        """ARGS at each of args_weights: the steered attribute's reward model read at every prefix
        (models/decoding/reward_guidance.py), its scale the sd of that reward over the base samples. Needs
        a reward model the decoder can read (a RewardScorer); none is skipped with a log line."""
        from models.decoding.reward_guidance import reward_as_value

        c = self.config
        attribute = c.steer_attribute
        scorer = self.scorers.get(attribute)
        if not c.args_weights or not hasattr(scorer, "model"):
            if c.args_weights:
                self.progress(f"no ARGS rows: no reward model to read for {attribute!r}")
            return []
        sd = float(base.frame[f"learned_{attribute}"].std(ddof=1))
        try:
            reward = {attribute: reward_as_value(scorer, scale=sd if sd > 0 else 1.0,
                                                 vocab_size=self.base.config.vocab_size)}
        except ValueError as err:       # an encoder classifier, or another tokenizer: nothing to read per prefix
            self.progress(f"no ARGS rows: {err}")
            return []
        runs = []
        for w in c.args_weights:
            params = {"weight": w, "attribute": attribute}
            runs.append(self.run_vas({attribute: w}, "scalar", "args", params, value_models=reward))
            self.progress(f"ARGS weight={w}: done")
        return runs

    def run_vas_rerank(self, beta: float, parameterization: str) -> list[MethodRun]:
        """N VAS samples per prompt draw (candidates 0..N-1, see sampling(); candidate 0 is plain VAS), the
        best by the learned reward Best-of-N uses; one pool of max(N) serves every N."""
        c = self.config
        attribute = c.steer_attribute
        soft = is_distributional(parameterization)
        params = {"beta": beta, "parameterization": parameterization, "attribute": attribute,
                  **({"soft": True} if soft else {})}
        pool = [self.run_vas({attribute: beta}, parameterization, "vas_rerank", params, soft=soft, candidate=k)
                for k in range(max(c.rerank_ns))]
        scores = np.stack([f.frame[f"learned_{c.bon_attribute}"].to_numpy() for f in pool])   # (n_max, S)
        runs = []
        for n in c.rerank_ns:
            best = scores[:n].argmax(0)                                                   # (S,)
            frame = pd.concat([pool[b].frame.iloc[[i]] for i, b in enumerate(best)], ignore_index=True)
            frame["params"] = json.dumps({**params, "n": n}, sort_keys=True)
            frame["kl_nats"] = frame["log_ratio"] + bon_kl(n)
            rerank = sum(self.reward_forwards(self.scorers[c.bon_attribute], r.frame.n_tokens.mean()) for r in pool[:n])
            runs.append(MethodRun("vas_rerank", {**params, "n": n}, frame, sum(r.seconds for r in pool[:n]),
                                  sum(r.forwards_per_sample for r in pool[:n]) + rerank))
        self.progress(f"VAS + rerank ({parameterization}, beta={beta}): done")
        return runs

    def run_dpo(self) -> MethodRun:
        """The DPO policy, sampled by the same loop: its path KL to pi0 is exact."""
        start = time.perf_counter()
        gen = sample(self.base, self.tokenizer, self.prompts.prompt.tolist(), self.sampling(), device=self.device,
                     steering=PolicySteering(self.dpo))
        seconds = time.perf_counter() - start
        frame = self.score(_frame(self.prompts, gen, "dpo", {}))
        # The base model also runs (for the KL); the DPO model alone would cost one forward per token.
        return MethodRun("dpo", {}, frame, seconds, float(frame.n_tokens.mean()))

    def run_all(self) -> list[MethodRun]:
        c = self.config
        self.progress(f"evaluating on {len(self.prompts)} prompt draws")
        runs = [self.run_base()]
        runs += self.run_best_of_n()
        runs += self.run_args(runs[0])
        if self.dpo is not None:
            runs.append(self.run_dpo())
        for parameterization in c.parameterizations:
            if c.steer_attribute not in self.value_models.get(parameterization, {}):
                continue
            # Distributional models serve several decoders: the soft value (exact tilt), the mean (the
            # paper's) and, with calibrated bins, the mean normal score; the others one.
            decoders = [({}, c.betas)]
            if is_distributional(parameterization):
                decoders = [({"soft": True}, c.betas), ({"soft": False}, c.betas)]
                if self.value_models[parameterization][c.steer_attribute].support.calibrated:
                    decoders.append(({"soft": False, "calibrated": True}, c.calibrated_betas))
            for flags, betas in decoders:
                for beta in betas:
                    params = {"beta": beta, "parameterization": parameterization, "attribute": c.steer_attribute,
                              **flags}
                    runs.append(self.run_vas({c.steer_attribute: beta}, parameterization, "vas", params,
                                             soft=flags.get("soft", True), calibrated=flags.get("calibrated", False)))
                    self.progress(f"VAS {family_of('vas', params)} beta={beta}: done")
        if c.steer_attribute in self.value_models.get(c.rerank_parameterization, {}):
            for beta in c.rerank_betas:
                runs += self.run_vas_rerank(beta, c.rerank_parameterization)
        grid_models = self.value_models.get(c.compose_parameterization, {})
        if {"positivity", "conciseness"} <= set(grid_models):
            for w_pos in c.compose_weights:
                for w_con in c.compose_weights:
                    weights = {"positivity": w_pos, "conciseness": w_con}
                    runs.append(self.run_vas(weights, c.compose_parameterization, "compose",
                                             {"weights": weights, "parameterization": c.compose_parameterization}))
            self.progress("composition grid: done")
        return runs


def summarize(runs: Sequence[MethodRun]) -> pd.DataFrame:
    """One row per (method, params): rewards with 95% intervals, KL, win rate, diversity, cost."""
    base = next(r.frame for r in runs if r.method == "base")
    key = ["prompt_id", "draw"]
    rows = []
    for run in runs:
        f = run.frame
        row = {"method": run.method, "params": json.dumps(run.params, sort_keys=True),
               "family": family_of(run.method, run.params), "n_samples": len(f)}
        row.update({f"param_{k}": v for k, v in run.params.items() if not isinstance(v, dict)})
        for column in [c for c in f.columns if c.startswith(("gold_", "learned_"))]:
            row[f"{column}_mean"], row[f"{column}_ci95"] = mean_ci95(f[column])
            if column.startswith("gold_"):
                paired = f[key + [column]].merge(base[key + [column]], on=key, suffixes=("", "_base"))
                diff = paired[column] - paired[f"{column}_base"]
                row[f"{column}_winrate"] = float(((diff > 0) + 0.5 * (diff == 0)).mean())
        row["kl_nats_mean"] = float(f.kl_nats.mean())
        row["distinct_2"] = distinct_n(f.completion.tolist(), 2)
        row["repeat_4gram_share"] = repeat_share(f.completion.tolist(), 4)
        row["mean_tokens"] = float(f.n_tokens.mean())
        row["seconds_per_sample"] = run.seconds / len(f)
        row["base_forwards_per_sample"] = run.forwards_per_sample
        rows.append(row)
    return pd.DataFrame(rows)


def headline_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows a reader compares first: base, Best-of-16/128, DPO, per VAS decoder the beta with
    the best gold positivity and the one whose KL is closest to Best-of-128's, VAS + rerank, ARGS."""
    picks = [summary[summary.method == "base"]]
    bon = summary[summary.method == "bon"]
    picks.append(bon[bon.param_n.isin([16, 128])] if "param_n" in bon else bon.iloc[0:0])
    picks.append(summary[summary.method == "dpo"])
    bon_kl = bon.kl_nats_mean.max() if len(bon) else None
    for _, group in summary[summary.method == "vas"].groupby("family"):
        chosen = {group.gold_positivity_mean.idxmax()}
        if bon_kl is not None:
            chosen.add((group.kl_nats_mean - bon_kl).abs().idxmin())
        picks.append(group.loc[sorted(chosen)])
    picks.append(summary[summary.method == "vas_rerank"])
    picks.append(summary[summary.method == "args"])
    return pd.concat(picks)


def headline_table(summary: pd.DataFrame) -> str:
    """Markdown table of headline_rows: gold rewards with 95% CI, learned reward, KL, win rate,
    diversity, and cost against Best-of-128 in wall time and in base-model forwards."""
    rows = headline_rows(summary)
    bon = summary[summary.method == "bon"]
    bon128 = bon[bon.param_n == bon.param_n.max()] if "param_n" in bon else bon
    ref_cost = float(bon128.seconds_per_sample.iloc[0]) if len(bon128) else float("nan")
    ref_fwd = float(bon128.base_forwards_per_sample.iloc[0]) \
        if len(bon128) and "base_forwards_per_sample" in bon128 else float("nan")
    lines = ["| method | gold positivity | gold conciseness | learned positivity | KL (nats) | win vs base "
             "| distinct-2 | 4-gram repeats | s/sample | cost vs BoN-128 | forwards vs BoN-128 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in rows.iterrows():
        params = json.loads(r.params)
        label = r.method + ("" if not params else " " + ", ".join(f"{k}={v}" for k, v in params.items()
                                                                   if k != "attribute"))
        forwards = r.get("base_forwards_per_sample", float("nan"))
        lines.append(
            f"| {label} | {r.gold_positivity_mean:.3f} ± {r.gold_positivity_ci95:.3f} | "
            f"{r.gold_conciseness_mean:.3f} ± {r.gold_conciseness_ci95:.3f} | {r.learned_positivity_mean:.3f} | "
            f"{r.kl_nats_mean:.2f} | {r.gold_positivity_winrate:.2f} | {r.distinct_2:.3f} | "
            f"{r.get('repeat_4gram_share', float('nan')):.3f} | {r.seconds_per_sample:.4f} | "
            f"{r.seconds_per_sample / ref_cost:.3f} | {forwards / ref_fwd:.3f} |")
    return "\n".join(lines)


def headline_numbers(summary: pd.DataFrame) -> dict[str, float]:
    """Base vs the best VAS beta vs Best-of-128 on gold positivity, and what each costs."""
    out: dict[str, float] = {}
    base = summary[summary.method == "base"].iloc[0]
    out["base/gold_positivity"] = base.gold_positivity_mean
    out["base/gold_positivity_ci95"] = base.gold_positivity_ci95
    bon = summary[summary.method == "bon"]
    if len(bon):
        top = bon.loc[bon.param_n.idxmax()]
        out[f"bon{int(top.param_n)}/gold_positivity"] = top.gold_positivity_mean
        out[f"bon{int(top.param_n)}/kl_nats"] = top.kl_nats_mean
        out[f"bon{int(top.param_n)}/seconds_per_sample"] = top.seconds_per_sample
    for family, group in summary[summary.method.isin(["vas", "vas_rerank"])].groupby("family"):
        best = group.loc[group.gold_positivity_mean.idxmax()]
        key = family.lower().replace("vas ", "vas_").replace(" + rerank, beta ", "_rerank_b").replace(" ", "_")
        out[f"{key}/best_{'n' if best.method == 'vas_rerank' else 'beta'}"] = \
            best.param_n if best.method == "vas_rerank" else best.param_beta
        out[f"{key}/gold_positivity"] = best.gold_positivity_mean
        out[f"{key}/gold_positivity_ci95"] = best.gold_positivity_ci95
        out[f"{key}/kl_nats"] = best.kl_nats_mean
        out[f"{key}/seconds_per_sample"] = best.seconds_per_sample
    best = best_eligible(summary, "args")
    if best is not None:
        out.update({"args/best_weight": best.param_weight, "args/gold_positivity": best.gold_positivity_mean,
                    "args/kl_nats": best.kl_nats_mean, "args/base_forwards_per_sample": best.base_forwards_per_sample})
    dpo = summary[summary.method == "dpo"]
    if len(dpo):
        out["dpo/gold_positivity"] = dpo.iloc[0].gold_positivity_mean
        out["dpo/kl_nats"] = dpo.iloc[0].kl_nats_mean
    out["base/seconds_per_sample"] = base.seconds_per_sample
    return {k: float(v) for k, v in out.items()}
