"""Continuous batching (models/serving/scheduler.py, models/lm/kv_cache.py): rows decoded in a shared running
batch, with requests joining and leaving between steps, get exactly the tokens they get alone."""

import threading

import pytest
import torch

from models.decoding.vas import VASConfig, vas_sample
from models.lm.kv_cache import join_lm, join_rows, keep_lm, keep_rows
from models.lm.sampling import CachedLM, SamplingConfig, encode_prompts, left_pad
from models.serving.scheduler import Scheduler

PROMPTS = ["I bought this kettle", "The lamp", "So I finally got the blender and", "Great"]


@pytest.fixture(scope="module")
def world(steering_world):
    return steering_world


# (prompts, weights, sampling, vas): every per-request setting differs somewhere.
REQUESTS = [
    (PROMPTS[:3], {"scalar": 2.0}, SamplingConfig(max_new_tokens=14, seed=1), VASConfig(top_k=10)),
    (PROMPTS[1:2] * 2, {}, SamplingConfig(max_new_tokens=20, seed=2, temperature=0.8), VASConfig()),
    (PROMPTS[2:], {"dist": 3.0, "shared": 1.5}, SamplingConfig(max_new_tokens=9, seed=3), VASConfig(top_k=25)),
    (PROMPTS[3:], {"dist": 2.0}, SamplingConfig(max_new_tokens=17, seed=4), VASConfig(top_k=6, soft=False, min_p=0)),
    (PROMPTS, {"shared": 2.0, "scalar": -1.0}, SamplingConfig(max_new_tokens=12, seed=5, batch_size=3),
     VASConfig(top_k=40, mask_outside_top_k=True)),
]


def solo(world, prompts, weights, sampling, vas):
    return vas_sample(world.base, world.tokenizer, prompts, world.models, weights, sampling, vas)


def same(a, b):
    assert a.completion_ids == b.completion_ids and a.texts == b.texts and a.finished == b.finished
    assert a.kl_nats == pytest.approx(b.kl_nats, abs=1e-4) and a.log_ratio == pytest.approx(b.log_ratio, abs=1e-4)
    assert a.base_logprobs == [pytest.approx(lp, abs=1e-4) for lp in b.base_logprobs]


def concurrently(scheduler, world, requests, gap: float = 0.0):
    out, errors = [None] * len(requests), []

    def run(i):
        prompts, weights, sampling, vas = requests[i]
        try:
            out[i] = scheduler.generate(prompts, world.models, weights, sampling, vas)
        except Exception as err:          # surfaced below, with its request
            errors.append((i, err))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
        threading.Event().wait(gap)
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return out


def test_batched_rows_equal_solo_rows_token_for_token(world):
    expected = [solo(world, *req) for req in REQUESTS]
    assert any(any(kl > 0 for kl in gen.kl_nats) for gen in expected), "the steering must change something"
    scheduler = Scheduler(world.base, world.tokenizer, "cpu")
    try:
        got = concurrently(scheduler, world, REQUESTS)
        # Shared steps: the batch ran fewer steps than the requests' steps summed.
        assert scheduler.steps < sum(req[2].max_new_tokens for req in REQUESTS)
    finally:
        scheduler.close()
    for want, have in zip(expected, got):
        same(have, want)


class StepGate:
    """A watcher that counts its request's steps and opens an event after `after` of them; with
    `other`, it records how many steps that gate had seen when this request joined the batch."""

    def __init__(self, after: int = 0, other=None):
        self.after, self.other, self.seen, self.opened = after, other, 0, threading.Event()
        self.other_seen_at_start = None

    def start(self, batch_size):
        if self.other is not None:
            self.other_seen_at_start = self.other.seen

    def tokens(self, fed):
        self.seen += 1
        if self.seen >= self.after:
            self.opened.set()


def test_a_request_joining_mid_batch_changes_no_one_elses_tokens(world):
    first, late = REQUESTS[0], REQUESTS[2]
    want_first, want_late = solo(world, *first), solo(world, *late)
    scheduler = Scheduler(world.base, world.tokenizer, "cpu")
    gate = StepGate(after=4)
    late_gate = StepGate(other=gate)
    got = {}
    try:
        thread = threading.Thread(target=lambda: got.update(first=scheduler.generate(
            first[0], world.models, first[1], first[2], first[3], watch=gate)))
        thread.start()
        assert gate.opened.wait(30)
        got["late"] = scheduler.generate(late[0], world.models, late[1], late[2], late[3], watch=late_gate)
        thread.join(30)
    finally:
        scheduler.close()
    # The late request joined a running batch: the first had fed some of its steps, not all.
    assert 4 <= late_gate.other_seen_at_start < gate.seen
    same(got["first"], want_first)
    same(got["late"], want_late)


def test_the_batch_bounds_queue_requests_without_changing_them(world):
    expected = [solo(world, *req) for req in REQUESTS[:4]]
    scheduler = Scheduler(world.base, world.tokenizer, "cpu", max_rows=3)
    try:
        got = concurrently(scheduler, world, REQUESTS[:4])
    finally:
        scheduler.close()
    for want, have in zip(expected, got):
        same(have, want)
    with pytest.raises(ValueError, match="max_rows"):
        Scheduler(world.base, world.tokenizer, "cpu", max_rows=0)


def test_a_failing_request_fails_alone(world):
    """A request whose steering raises mid-decode (calibrated values of a model without calibrated
    bins) gets the error; a request decoding beside it is unchanged."""
    bad = (PROMPTS[:1], {"scalar": 1.0}, SamplingConfig(max_new_tokens=6), VASConfig(calibrated=True))
    scheduler = Scheduler(world.base, world.tokenizer, "cpu")
    failed = {}

    def run_bad():
        try:
            scheduler.generate(bad[0], world.models, *bad[1:])
        except ValueError as err:
            failed["error"] = str(err)

    try:
        thread = threading.Thread(target=run_bad)
        thread.start()
        good = scheduler.generate(REQUESTS[1][0], world.models, *REQUESTS[1][1:])
        thread.join(30)
        with pytest.raises(ValueError, match="temperature"):
            scheduler.generate(PROMPTS[:1], {}, {}, SamplingConfig(temperature=0))
    finally:
        scheduler.close()
    assert "calibrated" in failed["error"]
    same(good, solo(world, *REQUESTS[1]))
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.generate(PROMPTS[:1], {}, {}, SamplingConfig(max_new_tokens=2))


def test_joined_and_dropped_cache_rows_give_each_row_its_own_logits(world):
    """join_lm (kv_cache.join_rows) pads the narrower batch on the left and keep_lm drops rows and unused
    columns: every row's next logits stay what its own batch gives."""
    tok, base = world.tokenizer, world.base
    a_ids, a_mask = left_pad(encode_prompts(tok, PROMPTS[:2]), tok.pad_token_id)
    b_ids, b_mask = left_pad(encode_prompts(tok, PROMPTS[2:]), tok.pad_token_id)
    assert a_ids.shape[1] != b_ids.shape[1]
    with torch.no_grad():
        a, b = CachedLM(base, a_ids, a_mask), CachedLM(base, b_ids, b_mask)
        joined = CachedLM(base, a_ids, a_mask)
        join_lm(joined, CachedLM(base, b_ids, b_mask))
        assert joined.mask.shape == (4, max(a_ids.shape[1], b_ids.shape[1]))
        fed = torch.tensor([5, 6, 7, 8])
        want = torch.cat([a.step(fed[:2]), b.step(fed[2:])])
        assert torch.allclose(joined.step(fed), want, atol=1e-5)
        keep_lm(joined, torch.tensor([2, 3]))          # the wider batch's rows
        assert joined.mask.shape[1] == b.mask.shape[1]
        assert torch.allclose(joined.step(fed[2:]), b.step(fed[2:]), atol=1e-5)
        # Nothing but full-attention caches joins.
        with pytest.raises(ValueError, match="DynamicLayer"):
            join_rows(object(), a_mask, object(), b_mask)
        with pytest.raises(ValueError, match="DynamicLayer"):
            keep_rows(object(), a_mask, torch.tensor([0]))
