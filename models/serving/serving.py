"""The request logic of `vas serve`, in plain Python (the FastAPI app in orchestration/serve.py
only moves JSON in and out): OpenAI /v1/completions requests -> VAS completions.

Steering travels in an extra request field, {"vas": {"weights": {...}, "top_k": 20, "soft": true}}
("calibrated": true steers by pi0-quantile, for value models trained with calibrated bins);
without it (or with every weight 0) a request gets plain base sampling. Decoding is
models.decoding.generate.decode_rows, the decode of `vas generate`. `logprobs` (at most 20) gives pi0's
top-n log-probabilities per token (models/lm/logprobs.py), so this server is itself an upstream
for black-box VAS. With an upstream (Engine(upstream=...)), the base model is behind another
OpenAI-compatible server and steered locally (models/decoding/blackbox.py); responses then report the
upstream requests and prompt tokens sent.

The value models are re-read between requests when data/value_models changes (a retrain replaced
it): `Engine.refresh` compares a cheap stat fingerprint, loads the new folder fully, then swaps
one reference, so a request uses one version from start to end. Streaming is live: chunks leave as
the decode draws each token (a row's last token comes with its final chunk).

Concurrency: with the local base model, requests from any number of threads decode together in one
running batch (models/serving/scheduler.py, continuous batching), each row with the tokens it would get
alone. With an upstream, each request decodes in its own thread, and the upstream calls of all of
them share the client's bound on calls in flight (models.decoding.upstream.UpstreamConfig.concurrency).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from models.decoding.generate import VALUE_MODELS, decode_configs, decode_rows, reward_scorers, score_all, value_tokenizer
from models.lm.logprobs import LogprobRecorder
from models.lm.sampling import encode_prompts, first_stop
from models.serving.openai_protocol import (
    OWNED_BY,
    Request,
    ServingError,
    as_chat,
    as_chat_chunk,
    chat_body,
    held_back,
    parse_request,
)
from models.stages import output_of
from models.value.value_store import find_value_models


def folder_fingerprint(root: Path) -> tuple:
    """A cheap marker of a folder's content: (path, size, mtime, inode) of every file under it.
    A retrain replaces the folder by a rename, so every entry changes."""
    if not root.is_dir():
        return ()
    return tuple(sorted((str(p.relative_to(root)), st.st_size, st.st_mtime_ns, st.st_ino)
                        for p in root.rglob("*") if p.is_file() for st in [p.stat()]))


@dataclass(frozen=True)
class ValueModels:
    """One loaded version of data/value_models: swapped as a whole, never changed in place."""

    version: str
    fingerprint: tuple
    models: dict


class Engine:
    """The loaded base model, reward scorers and current value models, and the completion logic."""

    def __init__(self, data_dir: str | Path, device: str = "auto", model_id: str = "vas", upstream=None,
                 max_batch_rows: int | None = None, max_batch_tokens: int | None = None):
        """upstream: a models.decoding.upstream.UpstreamConfig: completions come from that base model behind an
        OpenAI-compatible API, steered by the local value models (black-box VAS, models/decoding/blackbox.py);
        the local base model's weights are then never loaded, only its tokenizer (the value models').
        max_batch_rows, max_batch_tokens: the bounds of the running batch (models.serving.scheduler's
        MAX_ROWS and MAX_KV_TOKENS when None)."""
        from models.lm.lm import load_frozen_base, pick_device
        from models.serving.batched_scoring import BatchedScoring
        from models.serving.scheduler import MAX_KV_TOKENS, MAX_ROWS, Scheduler

        self.data_dir = Path(data_dir)
        self.model_id = model_id
        self.device = pick_device(device)
        base_dir = self.data_dir / output_of("base_model")
        if upstream is not None:
            from models.decoding.upstream import UpstreamClient

            # The value models read prefix + candidate texts: their context is the limit here.
            self.upstream, self.base, self.tokenizer = UpstreamClient(upstream), None, value_tokenizer(base_dir)
            from transformers import AutoConfig

            from models.lm.lm import base_model_dir
            config = AutoConfig.from_pretrained(str(base_model_dir(base_dir)), local_files_only=True)
        else:
            self.upstream = None
            self.base, self.tokenizer, _ = load_frozen_base(base_dir, device=str(self.device))
            config = self.base.config
        self.context_length = int(getattr(config, "n_positions", None) or config.max_position_embeddings)
        self.scorers = reward_scorers(self.data_dir, device=str(self.device))
        self.values = ValueModels("none", (), {})
        self._refreshing = threading.Lock()
        self.refresh()
        self.scheduler, self.score = None, None
        if self.base is not None:
            self.scheduler = Scheduler(self.base, self.tokenizer, self.device, max_batch_rows or MAX_ROWS,
                                       max_batch_tokens or MAX_KV_TOKENS)
            # Requests finishing together are scored together, on the scheduler's thread.
            self.score = BatchedScoring(partial(score_all, self.scorers), self.scheduler)

    def close(self) -> None:
        """Stop the batch scheduler once the requests in it are done."""
        if self.scheduler is not None:
            self.scheduler.close()

    def refresh(self) -> str:
        """Load data/value_models again if it changed since the last request; the version in use.
        A folder caught mid-replacement keeps the version already loaded (the next request retries).
        Requests call it from several threads: one loads, the others wait for it."""
        with self._refreshing:
            return self._refresh()

    def _refresh(self) -> str:
        from models.artifacts import dvc_md5
        from models.value.value_model import ValueModel

        root = self.data_dir / VALUE_MODELS
        fingerprint = folder_fingerprint(root)
        if fingerprint == self.values.fingerprint:
            return self.values.version
        try:
            # Beside the frozen base, a head on its own features shares its module (and its forward).
            models = {name: ValueModel.load(path, device=self.device, base_model=self.base)
                      for name, path in find_value_models(root).items()}
            version = dvc_md5(root).removesuffix(".dir") if models else "none"
        except (FileNotFoundError, NotADirectoryError):
            return self.values.version
        if fingerprint == folder_fingerprint(root):    # unchanged while loading: a whole version
            self.values = ValueModels(version, fingerprint, models)
        return self.values.version

    def models_body(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0, "owned_by": OWNED_BY}]}

    def handle(self, body: Any, chat: bool = False, timeout: float | None = None) -> dict:
        """A /v1/completions (chat: /v1/chat/completions) body -> its full response, without streaming."""
        req = self.prepare(body, chat)
        response = self.complete(req, timeout=timeout)
        return as_chat(response) if req.chat else response

    def prepare(self, body: Any, chat: bool = False) -> Request:
        """The request, checked against the value models current now (re-read if they changed).
        chat: a /v1/chat/completions body, its messages put through the tokenizer's chat template."""
        received = time.monotonic()
        self.refresh()
        req = parse_request(chat_body(body, self.tokenizer) if chat else body, self.model_id, set(self.values.models))
        req.timing["received"] = received
        if chat:
            req.chat = True
            req.head.update(id=req.head["id"].replace("cmpl-", "chatcmpl-", 1), object="chat.completion")
        if req.decode.get("calibrated"):
            for name, w in req.weights.items():
                try:
                    if w != 0.0:
                        self.values.models[name].check_calibrated(True)
                except ValueError as err:
                    raise ServingError(f"{name!r}: {err}", "vas.calibrated") from None
        if req.stop and self.upstream is not None:
            raise ServingError("stop needs the local base model; this server steers an upstream one", "stop",
                               "unsupported_parameter")
        if req.logprobs is not None and self.upstream is not None:
            raise ServingError("logprobs need the local base model; this server steers an upstream one",
                               "logprobs", "unsupported_parameter")
        encoded = encode_prompts(self.tokenizer, req.prompts)
        req.prompt_tokens = sum(len(ids) for ids in encoded)
        for i, ids in enumerate(encoded):
            if len(ids) >= self.context_length:
                raise ServingError(f"prompt {i} has {len(ids)} tokens; the context length is {self.context_length}",
                                   "prompt", "context_length_exceeded")
            if len(ids) + req.max_tokens > self.context_length:
                raise ServingError(f"prompt {i} ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) exceeds the "
                                   f"context length of {self.context_length}", "max_tokens", "context_length_exceeded")
        return req

    def complete(self, req: Request, watch=None, timeout: float | None = None) -> dict:
        """The /v1/completions response body of a prepared request. watch: told each decode step's
        tokens (streaming). timeout: seconds the decode may take (then TimeoutError)."""
        values = self.values      # this request's version, whatever a later refresh does
        if self.upstream is not None and threading.current_thread() is not threading.main_thread():
            import torch

            from models.serving.scheduler import WORKER_TORCH_THREADS
            torch.set_num_threads(WORKER_TORCH_THREADS)     # black-box decodes in the request's thread
        if req.logprobs is not None:
            watch = LogprobRecorder(self.tokenizer, req.logprobs)
        sampling, vas = decode_configs(seed=req.seed, temperature=req.temperature, max_new_tokens=req.max_tokens,
                                       stop=req.stop, **req.decode)
        active = {name: w for name, w in req.weights.items() if w != 0.0}
        expanded = [p for p in req.prompts for _ in range(req.n)]
        rows = decode_rows(self.base, self.tokenizer, expanded, {k: values.models[k] for k in active}, active,
                           sampling, vas, self.device, self.scorers, watch=watch, upstream=self.upstream,
                           scheduler=self.scheduler, score=self.score,
                           schedule={"timeout": timeout, "timing": req.timing})
        choices = [{"index": i, "text": row["completion"],
                    "logprobs": None if req.logprobs is None else watch.choice(i, row),
                    "finish_reason": "stop" if row["finished"] else "length",
                    "vas": {"kl_nats": row["kl_nats"], "n_tokens": row["n_tokens"],
                            "learned": {k.removeprefix("learned_"): v for k, v in row.items() if k.startswith("learned_")},
                            **({"upstream": row["upstream"]} if "upstream" in row else {})}}
                   for i, row in enumerate(rows)]
        completion_tokens = sum(row["n_tokens"] for row in rows)
        info = {"value_model_version": values.version, "weights": req.weights, "seed": req.seed,
                "top_k": vas.top_k, "min_p": vas.min_p, "soft": vas.soft and not vas.calibrated, "calibrated": vas.calibrated}
        if self.upstream is not None:
            # This request's own calls (others may be using the client at the same time).
            requests = sum(row["upstream"]["requests"] for row in rows)
            sent = sum(row["upstream"]["prompt_tokens"] for row in rows)
            info["top_k"] = min(vas.top_k, self.upstream.config.top_k)
            info["upstream"] = {"base_url": self.upstream.config.base_url, "model": self.upstream.config.model,
                                "requests": requests, "prompt_tokens_sent": sent,
                                "requests_per_token": requests / max(completion_tokens, 1)}
        info["timing"] = timing_summary(req.timing, [row["n_tokens"] for row in rows])
        return {**req.head, "choices": choices,
                "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": req.prompt_tokens + completion_tokens},
                "vas": info}

    def stream(self, req: Request, emit: Callable[[dict], None], timeout: float | None = None) -> dict:
        """Decode a prepared request, emitting OpenAI stream chunks as tokens are drawn: per choice the
        text each token adds (held back while it ends in half a UTF-8 character or in what may begin
        a stop string), then a last chunk per choice with the rest of its text, finish_reason and vas
        fields, then one with the usage. Chat requests get chat.completion.chunk deltas. Returns the
        whole /v1/completions response the chunks added up to."""
        if req.chat:
            opened, plain = set(), emit
            emit = lambda chunk: plain(as_chat_chunk(chunk, opened))     # noqa: E731
        tokens = TokenStream(self.tokenizer, req.head, emit, req.stop)
        response = self.complete(req, watch=tokens, timeout=timeout)
        for choice in response["choices"]:
            rest = choice["text"][len(tokens.sent.get(choice["index"], "")):]
            emit({**req.head, "choices": [{**choice, "text": rest, "vas": {**choice["vas"], **response["vas"]}}]})
        emit({**req.head, "choices": [], "usage": response["usage"]})
        return response


def timing_summary(timing: dict, row_tokens: list[int]) -> dict:
    """Seconds from receipt to the first token drawn and to the end, and per token after the first
    (the longest row's); None where the decode does not say (an upstream base model)."""
    done = time.monotonic()
    first = timing.get("first_token")
    ttft = None if first is None else first - timing["received"]
    longest = max(row_tokens, default=0)
    tpot = None if first is None or longest < 2 else (done - first) / (longest - 1)
    return {"time_to_first_token_s": ttft, "time_per_output_token_s": tpot, "latency_s": done - timing["received"]}


class TokenStream:
    """Turns the tokens a decode feeds, step by step and batch by batch, into text chunks per choice
    (a models.decoding.vas.Watched watcher; black-box decoding feeds texts, pieces()). A row's tokens end at
    its first EOS."""

    def __init__(self, tokenizer, head: dict, emit: Callable[[dict], None], stop: tuple[str, ...] = ()):
        self.tokenizer, self.head, self.emit, self.stop = tokenizer, head, emit, stop
        self.offset = self.size = 0
        self.ids: dict[int, list[int]] = {}
        self.sent: dict[int, str] = {}
        self.ended: set[int] = set()

    def start(self, batch_size: int) -> None:
        self.offset, self.size = self.offset + self.size, batch_size

    def tokens(self, fed: list[int]) -> None:
        for j, token in enumerate(fed):
            row = self.offset + j
            if row in self.ended:
                continue
            if token == self.tokenizer.eos_token_id:
                self.ended.add(row)
                continue
            self.ids.setdefault(row, []).append(token)
            self.send(row, self.tokenizer.decode(self.ids[row], skip_special_tokens=True))

    def pieces(self, new: dict[int, str]) -> None:
        """Black-box decoding (models/decoding/blackbox.py): the text each row's new token adds."""
        for j, piece in new.items():
            self.send(self.offset + j, self.sent.get(self.offset + j, "") + piece)

    def send(self, row: int, text: str) -> None:
        """A chunk with what `text`, the row's text so far, adds to what was sent: never a stop string
        nor what may be the start of one."""
        if self.stop:
            text = text[:at] if (at := first_stop(text, self.stop)) >= 0 else text[:len(text) - held_back(text, self.stop)]
        sent = self.sent.get(row, "")
        if text.endswith("\ufffd") or not text.startswith(sent) or text == sent:
            return
        self.emit({**self.head, "choices": [{"index": row, "text": text[len(sent):], "logprobs": None,
                                             "finish_reason": None}]})
        self.sent[row] = text
