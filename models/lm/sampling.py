"""Batched sampling from a causal LM with a KV cache, left padding and per-row stopping.

This is plain ancestral sampling from the frozen base model pi0. Value-augmented decoding
reuses the same loop through a `Steering` object, so every method draws from one seeded
generator in the same order: steering that changes nothing gives exactly base sampling's tokens.
With `uniforms` (one row of pre-drawn U[0, 1) per prompt, e.g. from `row_uniforms` keyed by each
row's identity), each token is drawn by inverse CDF from its row's own numbers instead of the
shared generator: a row's draws then do not depend on which rows share its batch, nor on which
batches ran before it (sharded rollouts).
The loop also measures, per row, the exact KL of the distribution it sampled from to pi0's
(both at the sampling temperature), summed along the path: 0 for plain sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Protocol, Sequence

import torch

from models.lm.train_utils import pad_rows, positions
from models.progress import progress_bar


@dataclass
class SamplingConfig:
    max_new_tokens: int = 80
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 64
    # A row ends at the first of these strings in its text, which its completion then stops before
    # (the OpenAI protocol's `stop`); its tokens keep the one that completed the string.
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    """Completions of a list of prompts, in prompt order."""

    prompts: list[str]
    completion_ids: list[list[int]]     # sampled tokens, EOS excluded
    texts: list[str]                    # decoded completions; prompt + text is the full sequence
    base_logprobs: list[list[float]]    # log pi0(token | prefix) at temperature 1, per sampled token
    finished: list[bool]                # ended with EOS rather than hitting max_new_tokens
    kl_nats: list[float] = field(default_factory=list)   # sum over steps of KL(pi_t || pi0_t)
    # log pi(y) - log pi0(y) of the sampled path (both at the sampling temperature): its mean over
    # samples is a Monte-Carlo estimate of the KL; per sample it is what reranking needs.
    log_ratio: list[float] = field(default_factory=list)

    @property
    def n_tokens(self) -> list[int]:
        return [len(ids) for ids in self.completion_ids]

    @classmethod
    def concat(cls, parts: Sequence[Generation]) -> Generation:
        """The generations of consecutive prompt batches as one, in order."""
        return cls(prompts=[p for g in parts for p in g.prompts],
                   completion_ids=[c for g in parts for c in g.completion_ids],
                   texts=[t for g in parts for t in g.texts],
                   base_logprobs=[lp for g in parts for lp in g.base_logprobs],
                   finished=[f for g in parts for f in g.finished],
                   kl_nats=[k for g in parts for k in g.kl_nats],
                   log_ratio=[r for g in parts for r in g.log_ratio])


class Steering(Protocol):
    """Changes pi0's next-token logits during sampling (value-augmented decoding implements it).

    The sampler calls start() once with the left-padded prompt batch, then per step adjust()
    with pi0's logits and advance() with the tokens it drew. Finished rows keep receiving EOS.
    A steering whose `wants_base_hidden` is true is also shown, before each adjust(), pi0's (B, H)
    last-layer hidden state at each row's last token, through base_hidden(hidden): what a value
    head on the frozen base's own features reads, without a forward of its own.
    """

    def start(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """ids, mask: (B, T) left-padded prompt ids and attention mask."""

    def adjust(self, base_logits: torch.Tensor) -> torch.Tensor:
        """(B, V) float32 base logits -> (B, V) logits to sample from (before temperature)."""

    def advance(self, tokens: torch.Tensor) -> None:
        """tokens: (B,) the tokens fed to the base model next (EOS for finished rows)."""


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt ids, starting with BOS when the tokenizer has one (GPT-2 style: BOS is EOS)."""
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [([bos] + row) if bos is not None else row for row in ids]


def join_prompt_completion(prompt: str, completion: str) -> str:
    """The text a reward model scores. Sampled completions carry their own leading space or
    punctuation; an imported completion that starts with a letter gets one space."""
    if not completion or not prompt or completion[0].isspace() or prompt[-1].isspace() or not completion[0].isalnum():
        return prompt + completion
    return prompt + " " + completion


def first_stop(text: str, stop: Sequence[str]) -> int:
    """Where the first of the stop strings in text begins, or -1."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else -1


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so every row ends at the last column."""
    return pad_rows(rows, pad_id, "left")


class CachedLM:
    """A causal LM stepped one token at a time over a left-padded batch, reusing its KV cache."""

    def __init__(self, model, ids: torch.Tensor, mask: torch.Tensor, keep_hidden: bool = False):
        self.model = model
        self.mask = mask
        self.keep_hidden = keep_hidden      # also keep the last layer's hidden state, (B, H)
        self.last_hidden: torch.Tensor | None = None
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                    **self.hidden_kwargs)
        self._keep(out)

    @property
    def hidden_kwargs(self) -> dict:
        return {"output_hidden_states": True} if self.keep_hidden else {}

    def _keep(self, out) -> None:
        # A model whose forward still takes the old `past_key_values` (remote code written before
        # transformers 5.25) swallows `cache=` in its **kwargs and starts a new cache every step: its
        # logits would be of the last token alone. Refuse it rather than decode wrongly.
        length = getattr(out.cache, "get_seq_length", None)
        if out.cache is None or (length is not None and length() != self.mask.shape[1]):
            raise RuntimeError(f"{type(self.model).__name__} did not return or extend its KV cache through "
                               "`cache=` (transformers >= 5.25's name for past_key_values): a model whose "
                               "remote code predates it cannot be decoded here")
        self.cache = out.cache
        self.last_hidden_logits = out.logits[:, -1, :]        # (B, V)
        # After the final norm, as the body returns it; None when not kept (never a stale step's).
        self.last_hidden = out.hidden_states[-1][:, -1, :] if self.keep_hidden else None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,), return next-token logits (B, V)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        pos = (self.mask.sum(-1, keepdim=True) - 1)             # (B, 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=pos,
                         cache=self.cache, use_cache=True, **self.hidden_kwargs)
        self._keep(out)
        return self.last_hidden_logits


def step_kl(steered_logits: torch.Tensor, base_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exact KL(softmax(steered / T) || softmax(base / T)) per row, in nats: (B, V) -> (B,)."""
    logp = torch.log_softmax(steered_logits / temperature, -1)
    logq = torch.log_softmax(base_logits / temperature, -1)
    p = logp.exp()
    # Tokens the steered distribution excludes (-inf logits) contribute 0, not 0 * -inf = NaN.
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1).clamp(min=0.0)


def row_uniforms(keys: Sequence[Sequence[int]], n_steps: int) -> torch.Tensor:
    """(len(keys), n_steps) float64 U[0, 1) draws, row i from a generator seeded by keys[i] alone
    (numpy's SeedSequence of the key, e.g. (seed, prompt index, sample index))."""
    import numpy as np

    rows = [np.random.default_rng([int(k) for k in key]).random(n_steps) for key in keys]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, n_steps), dtype=torch.float64)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B, V) probabilities (rows need not sum to exactly 1), (B,) U[0, 1) -> (B,) token ids: the
    first token whose cumulative probability exceeds u x the row's total, so a token of probability
    0 is never drawn."""
    cdf = probs.double().cumsum(-1)
    target = (u.to(cdf.device, torch.float64) * cdf[:, -1])[:, None]
    token = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # u x total can round up to the total: fall back to the last token of positive probability.
    last = (probs > 0).long().cumsum(-1).argmax(-1)
    return torch.minimum(token, last)


def sample_batch(model, tokenizer, prompts: Sequence[str], config: SamplingConfig,
                 generator: torch.Generator, steering: Steering | None = None,
                 device: torch.device | str = "cpu", uniforms: torch.Tensor | None = None) -> Generation:
    """Sample one completion per prompt, all rows in one batch; with uniforms ((B, >= max_new_tokens)
    U[0, 1)), row i's token at step t is the inverse CDF of uniforms[i, t], not a generator draw."""
    ids, mask = left_pad(encode_prompts(tokenizer, prompts), tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    share_hidden = bool(getattr(steering, "wants_base_hidden", False))
    lm = CachedLM(model, ids, mask, keep_hidden=share_hidden)
    if steering is not None:
        steering.start(ids, mask)
    draws = Draws(len(prompts), config, tokenizer, generator, device, uniforms)
    logits = lm.last_hidden_logits
    while not draws.finished:
        base_logits = logits.float()
        if steering is not None and share_hidden:
            steering.base_hidden(lm.last_hidden)
        fed = draws.draw(base_logits, None if steering is None else steering.adjust(base_logits))
        if draws.finished:
            break
        logits = lm.step(fed)
        if steering is not None:
            steering.advance(fed)
    return draws.generation(prompts)


class StepLogits:
    """One step's (B, V) base and steered logits with each row's temperature (B, 1), and what a
    draw reads from them, each computed once for all rows: a batch of the serving scheduler spans
    many requests, and `rows()` gives each its part. Row-wise operations only, so a row's numbers
    do not depend on the rows beside it."""

    def __init__(self, base: torch.Tensor, steered: torch.Tensor, temperature: torch.Tensor):
        self.base, self.steered, self.temperature = base, steered, temperature

    @cached_property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.steered / self.temperature, dim=-1)

    @cached_property
    def kl(self) -> torch.Tensor:
        """(B,) the exact KL of each row's steered distribution to pi0's (step_kl)."""
        return step_kl(self.steered, self.base, self.temperature)

    @cached_property
    def base_logprobs(self) -> torch.Tensor:
        return torch.log_softmax(self.base, -1)

    @cached_property
    def log_ratios(self) -> torch.Tensor:
        return (torch.log_softmax(self.steered / self.temperature, -1)
                - torch.log_softmax(self.base / self.temperature, -1))

    def base_logprob_of(self, token: torch.Tensor) -> torch.Tensor:
        """(B,) log pi0(token) at temperature 1."""
        return self.base_logprobs.gather(1, token[:, None]).squeeze(1)

    def log_ratio_of(self, token: torch.Tensor) -> torch.Tensor:
        """(B,) log pi(token) - log pi0(token), both at the sampling temperature."""
        return self.log_ratios.gather(1, token[:, None]).squeeze(1)

    def rows(self, part: slice) -> StepLogits:
        """The same step for rows `part`, reading what is already computed for all rows."""
        view = StepLogits(self.base[part], self.steered[part], self.temperature[part])
        for name in ("probs", "kl", "base_logprobs", "log_ratios"):
            if name in self.__dict__:
                view.__dict__[name] = self.__dict__[name][part]
        return view


class Draws:
    """The per-row state of one batch's sampling across steps: the tokens drawn, pi0's log-probs,
    each row's end, KL and log-ratio. sample_batch keeps one per batch; the serving scheduler
    (models/serving/scheduler.py) one per request batch, so both draw the same tokens from the same logits."""

    def __init__(self, batch: int, config: SamplingConfig, tokenizer, generator: torch.Generator,
                 device: torch.device | str = "cpu", uniforms: torch.Tensor | None = None):
        self.config, self.tokenizer, self.generator, self.uniforms = config, tokenizer, generator, uniforms
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.step = 0
        self.kl = torch.zeros(batch, device=device)
        self.log_ratio = torch.zeros(batch, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.tokens_out = torch.full((batch, config.max_new_tokens), self.pad, dtype=torch.long, device=device)
        self.logprobs_out = torch.zeros((batch, config.max_new_tokens), device=device)
        self.lengths = torch.full((batch,), config.max_new_tokens, dtype=torch.long, device=device)
        self.stop = tuple(s for s in config.stop if s)
        self.finished = config.max_new_tokens < 1

    def draw(self, base_logits: torch.Tensor, steered: torch.Tensor | None) -> torch.Tensor:
        """One step: (B, V) float32 base logits and the logits to sample from (None: the base's) ->
        (B,) the tokens to feed next (EOS for finished rows). Sets `finished` once every row has
        ended or max_new_tokens are drawn; the tokens of that last step are then not to be fed."""
        # Steering that changed nothing (the very tensor back) adds exactly 0 KL and 0 log-ratio.
        steering = steered is not None and steered is not base_logits
        logits = StepLogits(base_logits, steered if steering else base_logits, self.temperatures(base_logits))
        return self.record(self.sample(logits.probs), logits, steering)

    def temperatures(self, like: torch.Tensor) -> torch.Tensor:
        """(B, 1) this batch's temperature, a column so that several batches' rows stack."""
        return torch.full((like.shape[0], 1), float(self.config.temperature), device=like.device)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """(B,) tokens drawn from probs (B, V): the generator's draws, or the rows' own uniforms."""
        if self.uniforms is None:
            return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        return inverse_cdf(probs, self.uniforms[:, self.step])

    def record(self, token: torch.Tensor, logits: StepLogits, steering: bool) -> torch.Tensor:
        """Keep this step's drawn tokens (B,) with what logits say of them; the tokens to feed next."""
        done, step = self.done, self.step
        if steering:
            self.kl += torch.where(done, 0.0, logits.kl)
            self.log_ratio += torch.where(done, 0.0, logits.log_ratio_of(token))
        token = torch.where(done, torch.full_like(token, self.pad), token)
        self.logprobs_out[:, step] = logits.base_logprob_of(token)
        self.tokens_out[:, step] = token
        newly_done = (~done) & (token == self.eos)
        self.lengths = torch.where(newly_done, torch.full_like(self.lengths, step), self.lengths)
        self.done = done | newly_done
        if self.stop:
            self._stop_rows(step)
        self.step += 1
        self.finished = bool(self.done.all()) or self.step == self.config.max_new_tokens
        # Finished rows keep stepping on EOS so the batch stays rectangular; their tokens are ignored.
        return torch.where(self.done, torch.full_like(token, self.eos), token)

    def _stop_rows(self, step: int) -> None:
        """End the rows whose text now holds a stop string, keeping this step's token."""
        for i in (~self.done).nonzero().flatten().tolist():
            if first_stop(self.tokenizer.decode(self.tokens_out[i, :step + 1].tolist(), skip_special_tokens=True),
                          self.stop) >= 0:
                self.done[i] = True
                self.lengths[i] = step + 1

    def generation(self, prompts: Sequence[str]) -> Generation:
        completion_ids, logprobs = [], []
        for i in range(len(prompts)):
            n = int(self.lengths[i])
            completion_ids.append(self.tokens_out[i, :n].tolist())
            logprobs.append(self.logprobs_out[i, :n].tolist())
        # Not stripped: prompt + text is exactly the sampled sequence (the leading space is a token).
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
        if self.stop:
            texts = [t if (at := first_stop(t, self.stop)) < 0 else t[:at] for t in texts]
        return Generation(list(prompts), completion_ids, texts, logprobs, self.done.tolist(), self.kl.tolist(),
                          self.log_ratio.tolist())


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[str], config: SamplingConfig,
           device: torch.device | str = "cpu", steering: Steering | None = None,
           progress: Callable[[str], None] | None = None, uniforms: torch.Tensor | None = None) -> Generation:
    """Sample one completion per prompt in batches of config.batch_size, seeded once for the call;
    with uniforms ((len(prompts), max_new_tokens) U[0, 1), e.g. row_uniforms), each row draws from
    its own numbers (sample_batch) and the generator is unused."""
    if config.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {config.temperature}")
    if uniforms is not None and tuple(uniforms.shape) != (len(prompts), config.max_new_tokens):
        raise ValueError(f"uniforms must be ({len(prompts)}, {config.max_new_tokens}), got {tuple(uniforms.shape)}")
    generator = torch.Generator(device=device).manual_seed(config.seed)
    parts: list[Generation] = []
    with progress_bar(desc="sampling", total=len(prompts), unit="completion") as bar:
        for start in range(0, len(prompts), config.batch_size):
            chunk = list(prompts[start : start + config.batch_size])
            rows = None if uniforms is None else uniforms[start : start + len(chunk)]
            parts.append(sample_batch(model, tokenizer, chunk, config, generator, steering, device, rows))
            bar.update(len(chunk))
            done_count = start + len(chunk)
            # About ten progress lines per call, however many batches.
            if progress is not None and (done_count * 10 // len(prompts) > start * 10 // len(prompts)):
                progress(f"sampled {done_count}/{len(prompts)} completions")
    return Generation.concat(parts)
