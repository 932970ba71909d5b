"""A base model reachable only through an OpenAI-compatible API: its top-k next-token log-probabilities.

One request per generated token: `completions.create(prompt=prefix_text, max_tokens=1, logprobs=k,
temperature=1, top_p=1)` on the official `openai` client, whose own retries (with exponential
backoff, for connection errors, 408, 409, 429 and 5xx) and timeout apply. Only the reply's
logprobs are used; the token the upstream drew itself matters only at the end of text (below).

What real servers return, and the rules applied (parse_top_logprobs):

- Up to k+1 entries: OpenAI and llama-cpp-python add the token they drew when it is outside the
  top k. Only the k most probable entries are kept, so the candidate set never depends on the
  upstream's own random draw.
- Keys are token texts, so byte tokens that are not whole UTF-8 come back empty (llama-cpp-python
  decodes with errors="ignore"), as U+FFFD, or as "bytes:\\x.." (OpenAI). Such a piece cannot be
  appended to a text prefix: it is dropped and its probability counted in Step.dropped_mass.
  Keys that collide (several tokens with one text; the reply is parsed keeping duplicate JSON
  keys) are merged: one candidate text with their summed probability.
- The end of text. An entry whose key is an EOS text (UpstreamConfig.eos_texts, e.g.
  "<|endoftext|>") is the end candidate: it competes with the others and ends the completion
  when drawn. Some servers (llama-cpp-python) name EOS with an empty key (dropped as above) and,
  when their own draw is EOS, reply with finish_reason "stop" and no logprobs at all: that step is
  detected explicitly (Step.stopped) and ends the completion, at the upstream's own EOS
  probability (not steered). To keep the upstream's draw from ending texts, give its EOS token id
  (UpstreamConfig.eos_token_id): every request then carries logit_bias {id: -100}, biasing EOS
  away from its draw (whether the reported logprobs still show EOS then depends on the server).
- A reply without logprobs that did not stop is a server without logprobs support: an
  UpstreamError naming the URL and the model.

The tail outside the top k is never seen over an API: black-box VAS renormalizes over the
candidates (models/decoding/blackbox.py).
"""

from __future__ import annotations

import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

DEFAULT_EOS_TEXTS = ("<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<eos>")


class UpstreamError(RuntimeError):
    """The upstream server cannot give what black-box VAS needs (unreachable, refused, no logprobs)."""


@dataclass
class UpstreamConfig:
    base_url: str                      # e.g. http://127.0.0.1:8080/v1
    model: str                         # the model name the upstream serves
    top_k: int = 20                    # logprobs asked per token (the public OpenAI API allows at most 5)
    max_retries: int = 3               # the openai client's own retries, with backoff, on 429, 5xx and timeouts
    timeout: float = 60.0              # seconds per request
    api_key: str | None = None         # None: $OPENAI_API_KEY, or "unused" (local servers ignore it)
    eos_texts: tuple[str, ...] = DEFAULT_EOS_TEXTS
    eos_token_id: int | None = None    # the upstream's EOS id: biased away from its own draw (logit_bias -100)
    concurrency: int = 8               # requests in flight to the upstream at once, over all rows of a step
    # llama.cpp's server (`llama-server`) re-uses the KV cache of a prompt's longest cached prefix
    # when a request says cache_prompt: true, so a row's text, re-sent with one more token each step,
    # is not evaluated again. None sends nothing (servers that refuse unknown fields).
    cache_prompt: bool | None = None

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"upstream top_k must be >= 1, got {self.top_k}")
        if self.concurrency < 1:
            raise ValueError(f"upstream concurrency must be >= 1, got {self.concurrency}")


@dataclass
class Step:
    """One upstream reply: pi0's top-k next pieces of text after a prefix."""

    texts: list[str | None] = field(default_factory=list)    # candidate texts; None is the end of text
    logprobs: list[float] = field(default_factory=list)      # log pi0 as reported (not renormalized)
    dropped_mass: float = 0.0          # pi0 probability of top-k entries that are not text (empty, broken UTF-8)
    stopped: bool = False              # the upstream drew EOS itself and reported no logprobs: the text ends
    prompt_tokens: int = 0             # the prefix's tokens, as the upstream counted them


def is_text(key: str) -> bool:
    """Whether a top_logprobs key is a piece of text that can be appended to a prefix."""
    return bool(key) and "\ufffd" not in key and not key.startswith("bytes:")


def parse_top_logprobs(entries: list[tuple[str, float]], k: int,
                       eos_texts: tuple[str, ...] = DEFAULT_EOS_TEXTS) -> tuple[list[str | None], list[float], float]:
    """(key, logprob) pairs of one step, duplicates kept -> (candidate texts, their logprobs, dropped mass).

    The k most probable entries are kept; EOS keys become one end candidate (None); keys that are
    not text are dropped, their probability summed; colliding keys merge by summing probabilities."""
    merged: dict[str | None, float] = {}
    dropped = 0.0
    for key, logprob in sorted(entries, key=lambda e: -e[1])[:k]:
        if not math.isfinite(logprob):
            continue                   # -inf: no mass (a biased-away EOS, say)
        text = None if key in eos_texts else key
        if text is not None and not is_text(text):
            dropped += math.exp(logprob)
            continue
        old = merged.get(text)
        merged[text] = logprob if old is None else max(old, logprob) + math.log1p(math.exp(-abs(old - logprob)))
    return list(merged), list(merged.values()), dropped


class _Pairs(dict):
    """A JSON object that also remembers its (key, value) pairs, duplicate keys included."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = pairs


def step_entries(choice: dict) -> list[tuple[str, float]] | None:
    """The first token's top logprobs as (key, logprob) pairs, from the legacy completions shape
    {"top_logprobs": [{key: logprob}]} or the chat / llama.cpp shape {"content": [{"top_logprobs":
    [{"token", "logprob"}]}]}; None when the reply has none."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return None
    top = logprobs.get("top_logprobs")
    if isinstance(top, list) and top and isinstance(top[0], dict) and top[0]:
        first = top[0]
        return [(str(key), float(v)) for key, v in getattr(first, "pairs", first.items())]
    content = logprobs.get("content")
    if isinstance(content, list) and content and isinstance(content[0], dict) and content[0].get("top_logprobs"):
        return [(str(e["token"]), float(e["logprob"])) for e in content[0]["top_logprobs"]]
    return None


class UpstreamClient:
    """One base model behind an OpenAI-compatible /v1/completions; counts requests and prompt tokens."""

    def __init__(self, config: UpstreamConfig):
        from openai import OpenAI  # only when an upstream is used

        self.config = config
        self.client = OpenAI(base_url=config.base_url, api_key=config.api_key or os.environ.get("OPENAI_API_KEY", "unused"),
                             max_retries=config.max_retries, timeout=config.timeout)
        self.requests = 0
        self.prompt_tokens = 0
        self._counting = threading.Lock()      # step() runs in several threads at once (step_many)
        self._pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="vas-upstream")

    def step_many(self, prefixes: Sequence[str], k: int | None = None, seeds: Sequence[int | None] = ()) -> list[Step]:
        """step() of every prefix, config.concurrency of them in flight at once (they share the
        bound with every other caller of this client), in the prefixes' order."""
        seeds = list(seeds) or [None] * len(prefixes)
        if len(prefixes) == 1:
            return [self.step(prefixes[0], k, seeds[0])]
        return list(self._pool.map(lambda args: self.step(args[0], k, args[1]), zip(prefixes, seeds)))

    def where(self) -> str:
        return f"the upstream {self.config.base_url} (model {self.config.model!r})"

    def step(self, prefix: str, k: int | None = None, seed: int | None = None) -> Step:
        """pi0's top-k continuations of the text `prefix` (k: the config's top_k by default)."""
        import openai

        k = k or self.config.top_k
        extra = {"logit_bias": {str(self.config.eos_token_id): -100}} if self.config.eos_token_id is not None else {}
        if seed is not None:
            extra["seed"] = seed
        if self.config.cache_prompt is not None:
            extra["extra_body"] = {"cache_prompt": self.config.cache_prompt}
        try:
            raw = self.client.completions.with_raw_response.create(
                model=self.config.model, prompt=prefix, max_tokens=1, logprobs=k, temperature=1.0, top_p=1.0,
                n=1, **extra)
        except openai.APIStatusError as err:
            if err.status_code in (408, 409, 429) or err.status_code >= 500:     # the ones the client retries
                raise UpstreamError(f"{self.where()} still answered HTTP {err.status_code} after "
                                    f"{self.config.max_retries} retries: {err.message}") from None
            raise UpstreamError(f"{self.where()} refused a request for logprobs={k}: HTTP {err.status_code} "
                                f"{err.message}") from None
        except openai.APIError as err:      # connection errors and timeouts, after the client's retries
            raise UpstreamError(f"{self.where()} did not answer after {self.config.max_retries} retries: "
                                f"{type(err).__name__}: {err}") from None
        try:
            body = json.loads(raw.text, object_pairs_hook=_Pairs)
            choice = body["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise UpstreamError(f"{self.where()} sent a reply that is not an OpenAI completion: {raw.text[:200]!r}") from None
        prompt_tokens = int((body.get("usage") or {}).get("prompt_tokens") or 0)
        with self._counting:
            self.requests += 1
            self.prompt_tokens += prompt_tokens
        entries = step_entries(choice)
        if entries is None:
            if choice.get("finish_reason") == "stop":
                return Step(stopped=True, prompt_tokens=prompt_tokens)
            raise UpstreamError(f"{self.where()} returned no logprobs for logprobs={k}: black-box VAS needs a "
                                f"/v1/completions endpoint that returns top-k log-probabilities")
        texts, logprobs, dropped = parse_top_logprobs(entries, k, self.config.eos_texts)
        drawn = choice.get("text") or ""
        if not texts and is_text(drawn):    # every top-k entry was a byte piece: continue with the upstream's draw
            texts, logprobs = [drawn], [0.0]
        if not texts:
            raise UpstreamError(f"{self.where()} gave no top-{k} entry that is text after {prefix[-40:]!r}")
        return Step(texts, logprobs, dropped, prompt_tokens=prompt_tokens)
