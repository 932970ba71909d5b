"""OpenAI `logprobs` for `vas serve`: the base model's top-n next-token log-probabilities along
each completion, in the legacy /v1/completions shape

    {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{text: logprob}, ...], "text_offset": [...]}

What they are: always pi0's, the frozen base model's, at temperature 1 (the model's own
distribution, as vLLM and llama.cpp report it), whatever the request's temperature or steering.
With VAS steering the tokens are the steered ones and the numbers still pi0's: log pi0 of each
token taken and pi0's top n at each state reached. That is what an upstream for black-box VAS
must give (models/decoding/upstream.py), and `vas serve` is one.

- n (the request's `logprobs`) is at most models.serving.openai_protocol.MAX_LOGPROBS = 20 (the public OpenAI API: 5). Each
  step lists exactly n entries; OpenAI and llama-cpp-python add the sampled token as an n+1-th
  when it is outside the top n, this server does not.
- A completion that ended with EOS lists the EOS step too, as the token text "<|endoftext|>"
  (the tokenizer's EOS text) with no text of its own (its text_offset is the completion's end).
- Keys are each token's text decoded alone. Tokens whose texts collide (byte pieces that are not
  whole UTF-8 decode to U+FFFD) share one key holding their summed probability.
"""

from __future__ import annotations

import math

import torch


def logaddexp(a: float, b: float) -> float:
    """log(e^a + e^b), without overflow."""
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


class LogprobRecorder:
    """A watcher for models.decoding.vas.Watched: keeps, per row and decode step, pi0's top n log-probabilities
    and log pi0(EOS), from the base logits the sampler shows before steering."""

    def __init__(self, tokenizer, n: int):
        self.tokenizer, self.n = tokenizer, n
        self.offset = self.size = 0
        self.steps: dict[int, list[tuple[list[float], list[int], float]]] = {}

    def start(self, batch_size: int) -> None:
        self.offset, self.size = self.offset + self.size, batch_size

    def tokens(self, fed: list[int]) -> None:
        pass

    def base_logits(self, logits: torch.Tensor) -> None:
        logp = torch.log_softmax(logits.float(), -1)
        values, ids = logp.topk(min(self.n, logp.shape[-1]), dim=-1)
        eos = logp[:, self.tokenizer.eos_token_id].tolist()
        for j, (v, i) in enumerate(zip(values.tolist(), ids.tolist())):
            self.steps.setdefault(self.offset + j, []).append((v, i, eos[j]))

    def choice(self, index: int, row: dict) -> dict:
        """The logprobs object of completion `index` (a models.decoding.generate.decode_rows row)."""
        ids, steps = row["completion_ids"], self.steps[index]
        tokens = [self.tokenizer.decode([t]) for t in ids]
        token_logprobs = list(row["base_logprobs"])
        if row["finished"]:                         # the EOS step, sampled but not part of the text
            tokens.append(self.tokenizer.eos_token)
            token_logprobs.append(steps[len(ids)][2])
        top = []
        for values, top_ids, _ in steps[: len(tokens)]:
            entry: dict[str, float] = {}
            for value, token in zip(values, top_ids):
                key = self.tokenizer.decode([token])
                entry[key] = logaddexp(entry[key], value) if key in entry else value
            top.append(entry)
        start = len(row["prompt"])
        offsets = [start + len(self.tokenizer.decode(ids[:j], skip_special_tokens=True)) for j in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [float(x) if math.isfinite(x) else -9999.0 for x in token_logprobs],
                "top_logprobs": top, "text_offset": offsets}
