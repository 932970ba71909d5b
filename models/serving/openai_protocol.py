"""The OpenAI protocol of `vas serve`, in plain Python: request bodies -> checked `Request`s, and
what chat completions change in the replies. models/serving/serving.py decodes them; orchestration/serve.py
only moves JSON.

Conventions, after the servers people run instead (cited where they are followed):
- `stop`: a string or up to 4 strings; a completion ends before the first one, which it does not
  include, with finish_reason "stop" (OpenAI's API reference for completions and chat).
- /v1/chat/completions: the messages go through the base tokenizer's own chat template with the
  generation prompt appended (transformers' apply_chat_template, as vLLM and llama.cpp's server
  do); a tokenizer without a template is a 400, never a guessed format.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_N = 64                  # completions per prompt
MAX_LOGPROBS = 20           # top log-probabilities per token (the public OpenAI API: 5); models/lm/logprobs.py
MAX_ROWS = 256              # completions per request (prompts x n)
OWNED_BY = "vas"


class ServingError(ValueError):
    """A bad request: becomes an OpenAI error body {"error": {message, type, param, code}} with status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.code, self.status, self.kind = param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    prompts: list[str]
    n: int = 1
    max_tokens: int = 16           # OpenAI's default for /v1/completions
    temperature: float = 1.0
    seed: int = 0
    stream: bool = False
    weights: dict[str, float] = field(default_factory=dict)
    decode: dict[str, Any] = field(default_factory=dict)    # top_k, min_p, soft, calibrated: absent keeps VASConfig's
    head: dict[str, Any] = field(default_factory=dict)      # id, object, created, model of the response
    logprobs: int | None = None    # pi0's top-n log-probabilities per token (models/lm/logprobs.py)
    prompt_tokens: int = 0         # the prompts' tokens, counted once when the request is checked
    stop: tuple[str, ...] = ()     # a completion ends before the first of these
    chat: bool = False             # a /v1/chat/completions request: replies in its shape
    timing: dict[str, float] = field(default_factory=dict)   # time.monotonic() of "received", "first_token"


def _number(value, param: str, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ServingError(f"{param} must be {'an integer' if integer else 'a number'}, got {value!r}", param)
    if not math.isfinite(value):
        raise ServingError(f"{param} must be finite, got {value!r}", param)
    return int(value) if integer else float(value)


# Fields of the OpenAI protocol this server does not implement, with the values that mean "off":
# any other value is refused, never silently ignored.
UNSUPPORTED = {"echo": (None, False), "suffix": (None,), "logit_bias": (None,),
               "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}


def parse_request(body: Any, model_id: str, known_rewards: set[str]) -> Request:
    """A /v1/completions JSON body -> Request, or a ServingError naming the bad parameter."""
    if not isinstance(body, dict):
        raise ServingError("the request body must be a JSON object")
    if body.get("model") != model_id:
        raise ServingError(f"the model {body.get('model')!r} does not exist; this server serves {model_id!r}",
                           "model", "model_not_found", status=404)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ServingError("prompt must be a string or a non-empty list of strings", "prompt")
    for name, off in UNSUPPORTED.items():
        if body.get(name) not in off:
            raise ServingError(f"{name} is not supported by this server", name, "unsupported_parameter")
    req = Request(prompts=prompts, stream=bool(body.get("stream") or False), stop=parse_stop(body.get("stop")),
                  head={"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                        "model": model_id})
    if body.get("n") is not None:
        req.n = _number(body["n"], "n", integer=True)
        if not 1 <= req.n <= MAX_N:
            raise ServingError(f"n must be between 1 and {MAX_N}, got {req.n}", "n")
    if len(prompts) * req.n > MAX_ROWS:
        raise ServingError(f"{len(prompts)} prompts x n={req.n} is over {MAX_ROWS} completions per request", "n")
    if body.get("max_tokens") is not None:
        req.max_tokens = _number(body["max_tokens"], "max_tokens", integer=True)
        if req.max_tokens < 1:
            raise ServingError(f"max_tokens must be at least 1, got {req.max_tokens}", "max_tokens")
    if body.get("temperature") is not None:
        req.temperature = _number(body["temperature"], "temperature")
        if req.temperature <= 0:
            raise ServingError("temperature must be > 0 (greedy decoding is not implemented)", "temperature")
    if body.get("logprobs") is not None:
        req.logprobs = _number(body["logprobs"], "logprobs", integer=True)
        if not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise ServingError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}", "logprobs")
        if req.stream:
            raise ServingError("logprobs are not supported with stream: true", "logprobs", "unsupported_parameter")
    # No seed: a fresh one, reported in the response so the request can be replayed.
    req.seed = _number(body["seed"], "seed", integer=True) if body.get("seed") is not None else secrets.randbelow(2**31)
    vas = body.get("vas") or {}
    if not isinstance(vas, dict):
        raise ServingError("vas must be an object such as {\"weights\": {\"positivity\": 2}}", "vas")
    weights = vas.get("weights") or {}
    if not isinstance(weights, dict):
        raise ServingError("vas.weights must map reward names to numbers", "vas.weights")
    for name, w in weights.items():
        if name not in known_rewards:
            raise ServingError(f"unknown reward {name!r}; known: {', '.join(sorted(known_rewards)) or 'none'}",
                               "vas.weights", "unknown_reward")
        req.weights[name] = _number(w, f"vas.weights.{name}")
    if vas.get("top_k") is not None:
        req.decode["top_k"] = _number(vas["top_k"], "vas.top_k", integer=True)
        if req.decode["top_k"] < 1:
            raise ServingError("vas.top_k must be at least 1", "vas.top_k")
    if vas.get("min_p") is not None:
        req.decode["min_p"] = _number(vas["min_p"], "vas.min_p")
        if not 0.0 <= req.decode["min_p"] < 1.0:
            raise ServingError("vas.min_p must be in [0, 1)", "vas.min_p")
    for flag in ("soft", "calibrated"):
        if vas.get(flag) is not None:
            if not isinstance(vas[flag], bool):
                raise ServingError(f"vas.{flag} must be true or false, got {vas[flag]!r}", f"vas.{flag}")
            req.decode[flag] = vas[flag]
    known = ("weights", "top_k", "min_p", "soft", "calibrated")
    unknown = sorted(set(vas) - set(known))
    if unknown:
        raise ServingError(f"unknown vas setting(s) {unknown}; known: {', '.join(known)}", "vas")
    return req




MAX_STOP = 4        # stop sequences per request, as OpenAI allows


def parse_stop(stop: Any) -> tuple[str, ...]:
    """OpenAI's `stop`: null, a string, or a list of up to 4 strings (empty ones mean nothing)."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP:
        raise ServingError(f"stop must be a string or a list of at most {MAX_STOP} strings, got {stop!r}", "stop")
    return tuple(s for s in stops if s)


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many characters at the end of text may be the start of a stop string (a stream holds
    them until the next token says)."""
    return max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)


def chat_prompt(tokenizer, messages: Any) -> str:
    """The prompt text of chat messages: the tokenizer's chat template with the assistant's turn
    opened. A BOS the template writes itself is dropped, since encoding the prompt adds it."""
    if not isinstance(messages, list) or not messages:
        raise ServingError("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ServingError(f"messages[{i}] must be an object with a string role and string content",
                               f"messages[{i}]")
    if not getattr(tokenizer, "chat_template", None):
        raise ServingError("this model's tokenizer has no chat template; send a prompt to /v1/completions instead",
                           "messages", "chat_template_missing")
    text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                         tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text


def chat_body(body: Any, tokenizer) -> dict:
    """A /v1/chat/completions body as the /v1/completions body it decodes as."""
    if not isinstance(body, dict):
        raise ServingError("the request body must be a JSON object")
    if body.get("logprobs") not in (None, False):
        raise ServingError("logprobs are not supported on chat completions; use /v1/completions", "logprobs",
                           "unsupported_parameter")
    converted = {k: v for k, v in body.items() if k not in ("messages", "max_completion_tokens", "logprobs")}
    converted["prompt"] = chat_prompt(tokenizer, body.get("messages"))
    if body.get("max_completion_tokens") is not None:    # the newer name of max_tokens
        converted["max_tokens"] = body["max_completion_tokens"]
    return converted


def as_chat(response: dict) -> dict:
    """A completions response in the chat.completion shape."""
    choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                "logprobs": None, "finish_reason": c["finish_reason"], "vas": c["vas"]}
               for c in response["choices"]]
    return {**response, "object": "chat.completion", "choices": choices}


def as_chat_chunk(chunk: dict, opened: set[int]) -> dict:
    """A completions stream chunk as a chat.completion.chunk: text becomes a delta, whose first
    one per choice carries the role (opened: the choices that had theirs)."""
    choices = []
    for c in chunk.get("choices", []):
        delta = {} if c["index"] in opened else {"role": "assistant"}
        opened.add(c["index"])
        if c.get("text"):
            delta["content"] = c["text"]
        choices.append({"index": c["index"], "delta": delta, "logprobs": None, "finish_reason": c["finish_reason"],
                        **({"vas": c["vas"]} if "vas" in c else {})})
    return {**chunk, "object": "chat.completion.chunk", "choices": choices}
