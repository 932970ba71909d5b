"""Continuous (iteration-level) batching for `vas serve`: one running batch, many requests.

A scheduler thread owns one batch of rows and their KV caches: the base model's, and one per
value model in use (the rows of the requests that steer with it). Between decode steps it admits
waiting requests (their prompts prefilled alone, then their rows joined to the caches,
models/lm/kv_cache.py) and retires the requests whose rows have all ended. Each step runs the base
model once over every row and each value model once over the rows that use it. Each request
then draws its own tokens: its own steering (weights, top-k, min_p, soft or calibrated,
temperature), its own seeded generator and max_tokens, and its own watcher (streaming).

A request's rows are drawn exactly as models.lm.sampling.sample_batch draws them alone, with the same
models.lm.sampling.Draws, the same ValueGuidance arithmetic and a generator seeded the same way. So
a row's tokens do not depend on which other requests share the batch: batched rows equal solo rows
token for token. The only difference is floating-point rounding of a wider matrix product, far
below what changes a draw. A request of more than batch_size rows is decoded as sample() does it,
one batch of rows after another, with one generator.

Plain Python with no HTTP: orchestration/serve.py's app calls Engine (models/serving/serving.py), and
Engine calls Scheduler.generate from its request threads. The scheduler serves
models.value.value_model.ValueModel objects, which compute candidate_outputs for many requests at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from models.decoding.vas import ValueGuidance, VASConfig
from models.lm.kv_cache import join_lm, join_rows, keep_lm, keep_rows
from models.lm.sampling import CachedLM, Draws, Generation, SamplingConfig, StepLogits, encode_prompts, left_pad
from models.value.value_model import ValueDecodeState

log = logging.getLogger(__name__)

MAX_ROWS = 32             # rows decoding at once (not tuned; the load test gains little from 16 to 64 in flight)
MAX_KV_TOKENS = 65_536    # prompt + max_tokens reserved per row, summed over the running rows
# Intra-op threads of torch in the scheduler's (and any non-main) thread. OpenMP teams started from
# a thread other than the main one cost more than they give here: one forward of the default
# world's base took 4.3 ms with 2 threads and 1.9 ms with 1 (1.7 ms with 2 in the main thread);
# SmolLM2-135M at 8 rows 108 ms against 97. The main thread keeps its own setting.
WORKER_TORCH_THREADS = 1
# Work asked for between steps (scoring finished requests) waits up to this many decode steps, so
# the requests finishing close together share it; it runs at once when nothing is decoding.
TASK_DELAY_STEPS = 8


@dataclass
class Job:
    """One request's batch of at most batch_size rows, decoded together as sample_batch decodes it."""

    prompts: list[str]
    ids: list[list[int]]
    sampling: SamplingConfig
    guidance: ValueGuidance
    generator: torch.Generator
    watch: object | None
    future: Future = field(default_factory=Future)
    draws: Draws | None = None
    timing: dict | None = None     # gets "first_token": time.monotonic() of the request's first draw
    cancelled: bool = False        # its caller gave up (a timeout): retired before the next step

    @property
    def rows(self) -> int:
        return len(self.prompts)

    @property
    def reserved_tokens(self) -> int:
        return self.rows * (max(map(len, self.ids)) + self.sampling.max_new_tokens)


@dataclass
class ValueRows:
    """One value model's view of the running batch: the rows of the jobs that steer with it, in
    batch order. A head on the base model's own features has no cache: it reads the base's hidden state."""

    model: object
    shared: bool
    state: object = None      # models.value.value_model.ValueDecodeState over its rows (None when shared)


def _pad_columns(top: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k0) candidate ids -> (B, k) with the first column repeated past k0 (scored, never read)."""
    return top if top.shape[1] == k else torch.cat([top, top[:, :1].expand(-1, k - top.shape[1])], 1)


class Scheduler:
    """The running batch and its thread. generate() is called from any thread and blocks until its
    request is decoded; close() stops the thread once the running and waiting requests are done."""

    def __init__(self, base, tokenizer, device, max_rows: int = MAX_ROWS, max_kv_tokens: int = MAX_KV_TOKENS):
        if max_rows < 1 or max_kv_tokens < 1:
            raise ValueError(f"max_rows and max_kv_tokens must be >= 1, got {max_rows} and {max_kv_tokens}")
        self.base, self.tokenizer, self.device = base, tokenizer, torch.device(device)
        self.max_rows, self.max_kv_tokens = max_rows, max_kv_tokens
        self.waiting: deque[Job] = deque()
        self.jobs: list[Job] = []                 # running, in batch order
        self.lm: CachedLM | None = None           # the base model over every running row
        self.values: dict[int, ValueRows] = {}    # id(value model) -> its rows
        self.tasks: deque = deque()              # (function, step it was asked at): soon()
        self.closed = False
        self.steps = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="vas-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the request side

    def generate(self, prompts: Sequence[str], value_models: Mapping, weights: Mapping[str, float],
                 sampling: SamplingConfig, vas: VASConfig | None = None, watch=None, timeout: float | None = None,
                 timing: dict | None = None) -> Generation:
        """What models.decoding.vas.vas_sample returns for these arguments, decoded in the shared batch.
        watch: told start(batch_size), then base_logits(logits) and tokens(ids) per step (models.decoding.vas.Watched).
        timeout: seconds for the whole request; past them its rows leave the batch and TimeoutError
        is raised. timing: a dict that gets "first_token", the time.monotonic() of the first draw."""
        if sampling.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {sampling.temperature}")
        guidance = ValueGuidance(value_models, weights, vas, base_body=getattr(self.base, "base_model", None))
        generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        encoded = encode_prompts(self.tokenizer, prompts)
        deadline = None if timeout is None else time.monotonic() + timeout
        parts = []
        for start in range(0, len(prompts), sampling.batch_size):
            end = start + sampling.batch_size
            job = Job(list(prompts[start:end]), encoded[start:end], sampling, guidance, generator, watch,
                      timing=timing if start == 0 else None)
            with self._cv:
                if self.closed:
                    raise RuntimeError("the scheduler is closed")
                self.waiting.append(job)
                self._cv.notify()
            try:
                parts.append(job.future.result(None if deadline is None else max(deadline - time.monotonic(), 0)))
            except FutureTimeout:
                job.cancelled = True
                with self._cv:
                    self._cv.notify()
                raise TimeoutError(f"the request did not finish within {timeout:g} s") from None
        return Generation.concat(parts)

    @property
    def running_rows(self) -> int:
        return sum(job.rows for job in self.jobs)

    def counts(self) -> tuple[int, int]:
        """(running, waiting) request batches."""
        with self._cv:
            return len(self.jobs), len(self.waiting)

    def soon(self, fn) -> None:
        """Run fn() on the scheduler's thread between two decode steps, within TASK_DELAY_STEPS
        steps (it must not raise)."""
        with self._cv:
            self.tasks.append((fn, self.steps))
            self._cv.notify()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests; the thread ends once the running and waiting ones are decoded."""
        with self._cv:
            self.closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the scheduler thread

    def _loop(self) -> None:
        torch.set_num_threads(WORKER_TORCH_THREADS)      # this thread's OpenMP setting only
        while True:
            with self._cv:
                while not (self.waiting or self.jobs or self.tasks or self.closed):
                    self._cv.wait()
                if self.closed and not (self.waiting or self.jobs or self.tasks):
                    return
                admitted = self._admissible()
                tasks = []
                if self.tasks and (not self.jobs or self.steps - self.tasks[0][1] >= TASK_DELAY_STEPS):
                    tasks = [fn for fn, _ in self.tasks]
                    self.tasks.clear()
            for task in tasks:
                task()
            if admitted:
                self._admit(admitted)
            if self.jobs:
                try:
                    self._step()
                except Exception as err:       # a failed forward: every running request gets the error
                    log.exception("decode step failed")
                    self._fail_all(err)

    def _admissible(self) -> list[Job]:
        """The waiting jobs that fit beside the running ones, in arrival order (a job that does not
        fit stops the admission, so a large request is not overtaken forever); one always fits an
        empty batch."""
        rows, tokens = self.running_rows, sum(job.reserved_tokens for job in self.jobs)
        admitted = []
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                continue
            if (self.jobs or admitted) and (rows + job.rows > self.max_rows
                                            or tokens + job.reserved_tokens > self.max_kv_tokens):
                break
            admitted.append(self.waiting.popleft())
            rows, tokens = rows + job.rows, tokens + job.reserved_tokens
        return admitted

    @torch.no_grad()
    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the jobs' prompts in one batch, then join their rows to the running batch. If that
        fails, each is admitted alone, so a request whose own prompt fails fails alone."""
        if len(jobs) > 1:
            try:
                return self._join(jobs, self._prefill(jobs))
            except Exception:
                log.debug("batched prefill failed; admitting one by one", exc_info=True)
        for job in jobs:
            try:
                prefilled = self._prefill([job])
            except Exception as err:
                job.future.set_exception(err)
                continue
            self._join([job], prefilled)

    def _prefill(self, jobs: list[Job]) -> tuple:
        """The jobs' prompts through the base model and through each value model they steer with,
        left padded together (nothing of the running batch changes yet)."""
        ids, mask = left_pad([row for job in jobs for row in job.ids], self.tokenizer.pad_token_id)
        # The base's hidden states only where a head on its own body reads them: asking for them
        # puts hooks on every module call of the forward (transformers' output capturing).
        models = _models_of(jobs)
        lm = CachedLM(self.base, ids.to(self.device), mask.to(self.device),
                      keep_hidden=any(shared for _, shared in models.values()))
        states = {}
        for key, (model, shared) in models.items():
            if not shared:
                rows = [row for job in jobs if key in _keys(job) for row in job.ids]
                v_ids, v_mask = left_pad(rows, self.tokenizer.pad_token_id)
                states[key] = model.start(v_ids.to(model.device), v_mask.to(model.device))
        draws = [Draws(job.rows, job.sampling, self.tokenizer, job.generator, self.device) for job in jobs]
        return lm, states, draws

    def _join(self, jobs: list[Job], prefilled: tuple) -> None:
        lm, states, draws = prefilled
        try:
            for key, (model, shared) in _models_of(jobs).items():
                rows = self.values.get(key)
                if rows is None:
                    self.values[key] = ValueRows(model, shared, states.get(key))
                elif not shared:
                    state = states[key]
                    rows.state.mask = join_rows(rows.state.cache, rows.state.mask, state.cache, state.mask)
                    rows.state.hidden = torch.cat([rows.state.hidden, state.hidden])
            if self.lm is None:
                self.lm = lm
            else:
                join_lm(self.lm, lm)
            self.lm.keep_hidden = self._hidden()
        except Exception as err:               # half-joined caches: start over
            for job in jobs:
                job.future.set_exception(err)
            self._fail_all(err)
            return
        for job, job_draws in zip(jobs, draws):
            job.draws = job_draws
            if job.watch is not None:
                job.watch.start(job.rows)
            self.jobs.append(job)

    def _hidden(self) -> bool:
        """Whether a running request steers with a head on the base's own body (it reads the base's
        last hidden state, so the next step must keep it)."""
        return any(rows.shared for rows in self.values.values())

    def _rows_of(self, key: int | None = None) -> list[tuple[Job, slice]]:
        """(job, its rows) in the base batch, or in value model `key`'s rows."""
        out, offset = [], 0
        for job in self.jobs:
            if key is None or key in _keys(job):
                out.append((job, slice(offset, offset + job.rows)))
                offset += job.rows
        return out

    @torch.no_grad()
    def _step(self) -> None:
        cancelled = [job for job in self.jobs if job.cancelled]
        if cancelled:
            self._retire(cancelled)
            if not self.jobs:
                return
        logits, hidden = self.lm.last_hidden_logits.float(), self.lm.last_hidden
        base_rows = dict((id(job), rows) for job, rows in self._rows_of())
        base_logits = {id(job): logits[base_rows[id(job)]] for job in self.jobs}
        tops = {id(job): job.guidance.candidates(base_logits[id(job)]) for job in self.jobs if job.guidance.active}
        # Each value model once over all its rows, at the widest top-k among them.
        outputs, value_rows = {}, {}
        for key, rows in self.values.items():
            members = self._rows_of(key)
            value_rows.update({(key, id(job)): sl for job, sl in members})
            width = max(tops[id(job)][1].shape[1] for job, _ in members)
            candidates = torch.cat([_pad_columns(tops[id(job)][1], width) for job, _ in members])
            state = rows.state
            if rows.shared:
                picked = torch.cat([hidden[base_rows[id(job)]] for job, _ in members])
                state = ValueDecodeState(cache=None, mask=None, hidden=picked.to(rows.model.device))
            outputs[key] = rows.model.candidate_outputs(state, candidates.to(rows.model.device))
        finished, fed, steered = [], {}, {}
        values: dict = {}     # (model, beta, calibrated) -> Q over all its rows, computed once
        for job in self.jobs:
            try:
                steered[id(job)] = self._steer(job, base_logits[id(job)], tops.get(id(job)), outputs, value_rows,
                                               values)
            except Exception as err:           # this request's own failure (e.g. a vocabulary mismatch)
                job.future.set_exception(err)
                finished.append(job)
        drawing = [job for job in self.jobs if id(job) in steered]
        if drawing:
            # What a draw reads (softmax, log-softmax, KL), once for every row; then each request
            # draws from its own rows with its own generator.
            step = StepLogits(torch.cat([base_logits[id(job)] for job in drawing]),
                              torch.cat([steered[id(job)] for job in drawing]),
                              torch.cat([job.draws.temperatures(base_logits[id(job)]) for job in drawing]))
            offset = 0
            for job in drawing:
                part = step.rows(slice(offset, offset + job.rows))
                offset += job.rows
                fed[id(job)] = job.draws.record(job.draws.sample(part.probs), part,
                                                steered[id(job)] is not base_logits[id(job)])
                if job.timing is not None and job.draws.step == 1:
                    job.timing["first_token"] = time.monotonic()
                if job.draws.finished:
                    job.future.set_result(job.draws.generation(job.prompts))
                    finished.append(job)
        self.steps += 1
        if finished:
            self._retire(finished)
        if not self.jobs:
            return
        for job in self.jobs:
            if job.watch is not None:
                job.watch.tokens(fed[id(job)].tolist())
        self.lm.keep_hidden = self._hidden()
        self.lm.step(torch.cat([fed[id(job)] for job in self.jobs]))
        for key, rows in self.values.items():
            if not rows.shared:
                rows.model.advance(rows.state, torch.cat([fed[id(job)] for job, _ in self._rows_of(key)])
                                   .to(rows.model.device))

    def _steer(self, job: Job, base_logits: torch.Tensor, top, outputs: dict, value_rows: dict,
               values: dict) -> torch.Tensor:
        """The job's logits to sample from this step: its guidance over its rows of the value
        models' outputs (the base logits themselves when it steers with nothing)."""
        if job.watch is not None and hasattr(job.watch, "base_logits"):
            job.watch.base_logits(base_logits)
        calibrated = job.guidance.config.calibrated
        states = [id(model) for _, model, _ in job.guidance.active]

        def q_of(model, key, candidates, beta):
            if (key, beta, calibrated) not in values:       # candidate by candidate: rows and columns slice
                values[(key, beta, calibrated)] = model.candidate_values(outputs[key], beta, calibrated)
            return values[(key, beta, calibrated)][value_rows[(key, id(job))], : candidates.shape[1]]

        return job.guidance.steer(base_logits, q_of, states, top)

    def _retire(self, finished: list[Job]) -> None:
        done = {id(job) for job in finished}
        keep = [sl for job, sl in self._rows_of() if id(job) not in done]
        kept_values = {key: [sl for job, sl in self._rows_of(key) if id(job) not in done] for key in self.values}
        self.jobs = [job for job in self.jobs if id(job) not in done]
        if not self.jobs:
            self.lm, self.values = None, {}
            return
        keep_lm(self.lm, _index(keep, self.device))
        for key, slices in kept_values.items():
            rows = self.values[key]
            if not slices:
                del self.values[key]
            elif not rows.shared:
                index = _index(slices, rows.model.device)
                rows.state.mask = keep_rows(rows.state.cache, rows.state.mask, index)
                rows.state.hidden = rows.state.hidden[index]

    def _fail_all(self, err: Exception) -> None:
        for job in self.jobs:
            if not job.future.done():
                job.future.set_exception(err)
        self.jobs, self.lm, self.values = [], None, {}


def _keys(job: Job) -> set[int]:
    return {id(model) for _, model, _ in job.guidance.active}


def _models_of(jobs: list[Job]) -> dict[int, tuple]:
    """id(model) -> (model, reads the base's hidden state) of every value model the jobs steer with."""
    return {id(model): (model, shared) for job in jobs
            for shared, (_, model, _) in zip(job.guidance.shares_base, job.guidance.active)}


def _index(slices: list[slice], device) -> torch.Tensor:
    return torch.cat([torch.arange(sl.start, sl.stop) for sl in slices]).to(device)
