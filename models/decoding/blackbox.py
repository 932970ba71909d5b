"""Black-box VAS: steering a base model reachable only through an OpenAI-compatible API.

Per generated token and row: one upstream request gives pi0's top-k next pieces of text after the
row's text so far (models/decoding/upstream.py). The local value models score each candidate as TEXT,
prefix + candidate, tokenized with their own tokenizer (never the upstream's, which may differ):
V(text) is the value head at the text's last token (ValueModel.text_values), Q(s, a) = V(s·a);
the end-of-text candidate is scored as the text followed by the value tokenizer's EOS, the
terminal state the value models were trained on. The draw is from

    pi(a|s) ∝ pi0_topk(a|s) · exp(Σ_i w_i · Q_i(s, a))

with pi0_topk the upstream's top-k renormalized over the candidates (the tail is unseen over an
API), per-request weights with ValueGuidance's semantics (validated there; weight 0 removes a
model exactly; distributional models give soft values at their weight, or means with soft=False),
and the request's temperature applied once to the steered and base logits. Weights all 0 draw
exactly from pi0_topk. kl_nats sums, per token, the exact KL of the distribution drawn from to
the renormalized top-k base distribution at the same temperature.

Rows are independent: each step sends one request per unfinished row, all at once (up to the
client's concurrency; models.decoding.upstream.UpstreamClient.step_many), and scores every row's
candidates in batched value forwards (no KV cache: each text is encoded whole, as the upstream
does with its prompt; a llama.cpp upstream re-uses its own cache with cache_prompt). Each
request's seed fixes its draws, so how many calls fly at once changes no token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from models.decoding.upstream import Step, UpstreamClient
from models.decoding.vas import ValueGuidance, VASConfig
from models.lm.sampling import SamplingConfig, encode_prompts, step_kl

SCORE_BATCH = 256          # candidate texts per value forward


@dataclass
class _Row:
    prompt: str
    text: str = ""
    n_tokens: int = 0
    finished: bool = False
    kl: float = 0.0
    requests: int = 0
    prompt_tokens: int = 0
    dropped_mass: float = 0.0
    stopped: bool = False          # ended by the upstream's own EOS draw (a reply without logprobs)


def candidate_values(model, tokenizer, prefixes: Sequence[str], steps: Sequence[Step], width: int,
                     beta: float | None, calibrated: bool = False) -> torch.Tensor:
    """(R, width) values of every prefix + candidate text (0 past a row's candidates)."""
    context = int(getattr(model.backbone.config, "n_positions", 0) or model.backbone.config.max_position_embeddings)
    where, texts, ends = [], [], []
    for r, (prefix, step) in enumerate(zip(prefixes, steps)):
        for c, text in enumerate(step.texts):
            where.append((r, c))
            texts.append(prefix + (text or ""))
            ends.append(text is None)
    rows = [ids + [tokenizer.eos_token_id] if end else ids for ids, end in zip(encode_prompts(tokenizer, texts), ends)]
    longest = max(len(ids) for ids in rows)
    if longest > context:
        raise ValueError(f"a candidate text is {longest} value-model tokens long; the value model's context is {context}")
    values = torch.cat([model.text_values(rows[i : i + SCORE_BATCH], tokenizer.pad_token_id, beta, calibrated).cpu()
                        for i in range(0, len(rows), SCORE_BATCH)])
    out = torch.zeros((len(prefixes), width), dtype=torch.float32)
    # Entries past a row's candidates stay 0: their base logprob is -inf, so they never count.
    out[[r for r, _ in where], [c for _, c in where]] = values
    return out


def blackbox_rows(client: UpstreamClient, tokenizer, prompts: Sequence[str], value_models: Mapping,
                  weights: Mapping[str, float], sampling: SamplingConfig, vas: VASConfig, watch=None) -> list[dict]:
    """One black-box VAS completion per prompt. tokenizer: the value models' own.

    Each dict: prompt, completion, kl_nats, n_tokens (upstream tokens drawn), finished, and upstream:
    {requests, prompt_tokens (sent), dropped_mass (summed over steps), stopped (by the upstream's
    own EOS draw)}. watch: a stream watcher
    (models.serving.serving.TokenStream), told each step's new text per row."""
    if sampling.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {sampling.temperature}")
    guidance = ValueGuidance(value_models, weights, vas)         # checks the weights, drops zeros
    k = min(vas.top_k, client.config.top_k)
    generator = torch.Generator().manual_seed(sampling.seed)
    rows = [_Row(p) for p in prompts]
    if watch is not None:
        watch.start(len(rows))
    for step in range(sampling.max_new_tokens):
        live, replies = [], []
        pending = [i for i, row in enumerate(rows) if not row.finished]
        # Every unfinished row's request of this step at once (the client bounds how many fly).
        steps = client.step_many([rows[i].prompt + rows[i].text for i in pending], k,
                                 [(sampling.seed * 100_003 + i * 1_009 + step) % 2**31 for i in pending])
        for i, reply in zip(pending, steps):
            row = rows[i]
            row.requests += 1
            row.prompt_tokens += reply.prompt_tokens
            row.dropped_mass += reply.dropped_mass
            if reply.stopped:        # the upstream drew EOS and reported nothing: the end, detected
                row.finished = row.stopped = True
            else:
                live.append(i)
                replies.append(reply)
        if not live:
            break
        width = max(len(reply.texts) for reply in replies)
        base = torch.full((len(live), width), float("-inf"), dtype=torch.float64)
        for r, reply in enumerate(replies):
            base[r, : len(reply.logprobs)] = torch.tensor(reply.logprobs, dtype=torch.float64)
        prefixes = [rows[i].prompt + rows[i].text for i in live]
        bonus = guidance.bonus(lambda model, _, beta: candidate_values(model, tokenizer, prefixes, replies, width, beta,
                                                                       vas.calibrated), guidance.steered(base))
        steered = base + bonus.cpu()
        kl = step_kl(steered, base, sampling.temperature)
        picks = torch.multinomial(torch.softmax(steered / sampling.temperature, -1), 1, generator=generator).squeeze(1)
        pieces = {}
        for r, i in enumerate(live):
            text = replies[r].texts[int(picks[r])]
            rows[i].kl += float(kl[r])
            if text is None:
                rows[i].finished = True
            else:
                rows[i].text += text
                rows[i].n_tokens += 1
                pieces[i] = text
        if watch is not None:
            watch.pieces(pieces)
    return [{"prompt": row.prompt, "completion": row.text, "kl_nats": row.kl, "n_tokens": row.n_tokens,
             "finished": row.finished,
             "upstream": {"requests": row.requests, "prompt_tokens": row.prompt_tokens, "dropped_mass": row.dropped_mass,
                          "stopped": row.stopped}}
            for row in rows]
