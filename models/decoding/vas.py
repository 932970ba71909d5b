"""Value Augmented Sampling decoding: pi(a|s) ∝ pi0(a|s) · exp(Σ_i w_i · Q_i(s, a)) over pi0's top-k.

`ValueGuidance` is a `models.lm.sampling.Steering`: the base sampler owns the loop, the seeded
generator, temperature and the exact per-step KL; the guidance only adds the value bonus to the
base logits. So weights that are all zero give base sampling token for token, and a weight of 0
removes its value model exactly (that model is never run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from models.lm.sampling import Generation, SamplingConfig, sample
from models.value.value_model import PER_TOKEN_HEADS, ValueDecodeState, ValueModel, centred, steered_candidates


@dataclass
class VASConfig:
    top_k: int = 40           # the default profile's evaluation.top_k: what is evaluated is what runs
    mask_outside_top_k: bool = False   # False: tokens outside the top-k keep their base logits
    # Distributional value models: True uses the soft value Q_w = (1/w)·log E[exp(w·R)] at each
    # model's weight w (the exact tilt pi0·exp(w·R)/Z when the values are exact); False uses the
    # histogram's mean, the paper's VAS. Other value models ignore it.
    soft: bool = True
    # Distributional value models with calibrated bins: True steers by the mean normal score of the
    # reward (its pi0-quantile through Phi^-1) instead of the reward itself, whatever `soft` says:
    # the tilt then ranks by quantile, as Best-of-N does, which a saturated learned reward cannot.
    # (Soft values of z amplify the noise of the extreme quantiles.) Other models refuse it.
    calibrated: bool = False
    # Only top-k tokens with pi0(a|s) >= min_p · max_a pi0(a|s) are steered (as min-p sampling filters,
    # Nguyen et al. 2024); the others keep their base logits, like tokens outside the top-k. 0 steers all
    # k. A value model knows least about the tokens pi0 rarely takes, and at a large beta one wrong value
    # makes such a token the likeliest: without it, about 1% of calibrated-VAS samples at beta 5 fell
    # into loops ("money money money ...") at hundreds of nats (docs/concepts.md, "Decoding").
    min_p: float = 0.01       # the default profile's evaluation.min_p


class ValueGuidance:
    """Adds Σ_i w_i · (Q_i - mean_k Q_i) to the base logits of the top-k base tokens, per step.

    Q is centred over the k candidates so the bonus does not shift the top-k's total mass against
    the tokens outside it by an arbitrary per-state offset of V (the paper's choice).
    """

    def __init__(self, value_models: Mapping[str, ValueModel], weights: Mapping[str, float],
                 config: VASConfig | None = None, base_body=None):
        self.config = config or VASConfig()
        if self.config.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.config.top_k}")
        if not 0.0 <= self.config.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.config.min_p}")
        unknown = sorted(set(weights) - set(value_models))
        if unknown:
            raise ValueError(f"no value model for weight(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(value_models)) or '(none)'}")
        for name, w in weights.items():
            if not math.isfinite(float(w)):
                raise ValueError(f"weight for {name!r} must be a finite number, got {w!r}")
        # Zero weights are dropped here, so their models are never run: weight 0 removes a reward exactly.
        self.active = [(name, value_models[name], float(w)) for name, w in weights.items() if float(w) != 0.0]
        self.states: list[ValueDecodeState] = []
        # Per-token heads whose backbone is the base model's body (base_body, the very module) read
        # the base's own hidden state: the sampler passes it (base_hidden), no value forward runs.
        self.shares_base = [base_body is not None and model.backbone is base_body
                            and model.parameterization in PER_TOKEN_HEADS for _, model, _ in self.active]
        self.wants_base_hidden = any(self.shares_base)

    def base_hidden(self, hidden: torch.Tensor) -> None:
        """(B, H) the base model's last-layer hidden state at each row's last token, this step."""
        for shared, (_, model, _), state in zip(self.shares_base, self.active, self.states):
            if shared:
                state.hidden = hidden.to(model.device)

    def start(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """A new prompt batch: fresh value caches (the sampler calls this once per batch)."""
        self.states = [ValueDecodeState(cache=None, mask=mask, hidden=None) if shared
                       else model.start(ids.to(model.device), mask.to(model.device))
                       for shared, (_, model, _) in zip(self.shares_base, self.active)]

    def adjust(self, base_logits: torch.Tensor) -> torch.Tensor:
        """(B, V) base logits -> (B, V) steered logits (temperature is the sampler's job)."""
        # Only asked of models when set, so any object with candidate_q(state, candidates, beta) steers.
        calibrated = {"calibrated": True} if self.config.calibrated else {}
        return self.steer(base_logits, lambda model, state, top, beta: model.candidate_q(
            state, top.to(model.device), beta=beta, **calibrated))

    def candidates(self, base_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pi0's top-k: (B, k) base logits and token ids, the tokens a value bonus can go to."""
        return base_logits.topk(min(self.config.top_k, base_logits.shape[-1]), dim=-1)

    def steer(self, base_logits: torch.Tensor, q_of: Callable, states: Sequence | None = None,
              top: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """adjust(), with q_of(model, state, top_ids, beta) giving model i's (B, k) Q over the
        candidates from states[i] (self.states unless given): the serving scheduler passes Q it computed
        for several requests' rows at once (models/serving/scheduler.py). top: candidates(base_logits), if known."""
        if not self.active:
            return base_logits       # the very same tensor: base sampling, bit for bit
        top_logits, top = top if top is not None else self.candidates(base_logits)    # (B, k)
        for name, model, _ in self.active:
            if int(top.max()) >= model.vocab_size:
                raise ValueError(f"value model {name!r} has a vocabulary of {model.vocab_size} tokens but the "
                                 f"base model proposed token {int(top.max())}: they must share a tokenizer")
        bonus = self.bonus(lambda model, state, beta: q_of(model, state, top, beta), self.steered(top_logits), states)
        bonus = bonus.to(base_logits)
        if self.config.mask_outside_top_k:
            steered = torch.full_like(base_logits, float("-inf"))
            return steered.scatter(1, top, base_logits.gather(1, top) + bonus)
        return base_logits.scatter_add(1, top, bonus)

    def steered(self, candidate_logits: torch.Tensor) -> torch.Tensor | None:
        """steered_candidates at this guidance's min_p."""
        return steered_candidates(candidate_logits, self.config.min_p)

    def bonus(self, q_of: Callable, steered: torch.Tensor | None = None, states: Sequence | None = None) -> torch.Tensor:
        """Σ_i w_i · (Q_i - mean Q_i), (B, k) float64, where q_of(model, state, beta) gives model i's
        Q over the k candidates (B, k): token ids here, candidate texts in black-box decoding
        (models/decoding/blackbox.py). beta is the model's weight for soft values, None for mean values.
        steered (B, k) bool, or None for all: the candidates that get a bonus, centred over them;
        the others get 0. states: one per active model (self.states unless given)."""
        total = torch.zeros((), dtype=torch.float64)          # no active model: no bonus
        states = self.states if states is None else states
        for (_, model, weight), state in zip(self.active, states or [None] * len(self.active)):
            q = q_of(model, state, self.beta(weight))
            # Centred in float64: k equal values (an untrained head) then centre to exactly 0.
            q = q.double()                                                           # (B, k)
            total = weight * centred(q, None if steered is None else steered.to(q.device)) + total.to(q.device)
        return total

    def beta(self, weight: float) -> float | None:
        """The beta a model's soft value is taken at: its weight, or None for mean (and calibrated) values."""
        return weight if self.config.soft and not self.config.calibrated else None

    def advance(self, tokens: torch.Tensor) -> None:
        """tokens (B,): what the base model is fed next; every value prefix grows by it too."""
        for shared, (_, model, _), state in zip(self.shares_base, self.active, self.states):
            if not shared:
                model.advance(state, tokens.to(model.device))


class Watched:
    """A Steering that reports, per step, the tokens the sampler feeds the base model (streaming):
    watch.start(batch_size) per prompt batch, watch.tokens(list of ids) per step. The sampler stops
    before feeding a row's last token, so the watcher never sees it. A watcher with a base_logits
    method is also shown pi0's (B, V) logits of every step, before steering (logprobs in `vas serve`).
    Steers exactly as `steering`."""

    def __init__(self, steering, watch):
        self.steering, self.watch = steering, watch
        self.wants_base_hidden = getattr(steering, "wants_base_hidden", False)

    def base_hidden(self, hidden: torch.Tensor) -> None:
        self.steering.base_hidden(hidden)

    def start(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.watch.start(ids.shape[0])
        self.steering.start(ids, mask)

    def adjust(self, base_logits: torch.Tensor) -> torch.Tensor:
        if hasattr(self.watch, "base_logits"):
            self.watch.base_logits(base_logits)
        return self.steering.adjust(base_logits)

    def advance(self, tokens: torch.Tensor) -> None:
        self.watch.tokens(tokens.tolist())
        self.steering.advance(tokens)


def vas_sample(base_model, tokenizer, prompts: Sequence[str], value_models: Mapping[str, ValueModel],
               weights: Mapping[str, float], sampling_config: SamplingConfig,
               vas_config: VASConfig | None = None, device: torch.device | str = "cpu",
               progress: Callable[[str], None] | None = None, watch=None) -> Generation:
    """Sample with VAS: the base sampler steered by the weighted value models. kl_nats is exact.
    watch: an object told each step's tokens as they are drawn (see Watched), or None."""
    guidance = ValueGuidance(value_models, weights, vas_config, base_body=getattr(base_model, "base_model", None))
    steering = guidance if watch is None else Watched(guidance, watch)
    return sample(base_model, tokenizer, prompts, sampling_config, device=device, steering=steering,
                  progress=progress)
