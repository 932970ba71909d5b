"""Black-box VAS: a base model reachable only through an OpenAI-compatible API (models/decoding/upstream.py,
models/decoding/blackbox.py), and the `logprobs` of `vas serve` that make it such an upstream.

Upstreams: `vas_upstream`, `vas serve` on loopback serving the smoke world's base model, and
`upstream`, a URL the protocol-only tests run against: that same server, and a real llama.cpp
server (llama-cpp-python) serving the same weights exported to GGUF, through the `llamacpp`
fixture of tests/conftest.py (skipped where that fixture or its server is absent).
"""

import json
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

PROMPT = "The movie was"


# ---------------------------------------------------------------------------- parsing, no server

def test_top_logprobs_keep_k_merge_collisions_and_drop_non_text():
    from models.decoding.upstream import parse_top_logprobs

    lp = math.log
    # k + 1 entries (the server's own draw " z" added outside its top 3), " a" twice, an empty key
    # (a byte piece or a nameless EOS), a broken UTF-8 piece and an EOS text.
    entries = [(" a", lp(0.3)), ("", lp(0.2)), (" a", lp(0.1)), ("<|endoftext|>", lp(0.05)),
               ("\ufffd", lp(0.04)), (" z", lp(0.01))]
    texts, logprobs, dropped = parse_top_logprobs(entries, k=3)
    assert texts == [" a"] and logprobs == pytest.approx([lp(0.4)]) and dropped == pytest.approx(0.2)
    texts, logprobs, dropped = parse_top_logprobs(entries, k=5)
    assert texts == [" a", None] and logprobs == pytest.approx([lp(0.4), lp(0.05)])
    assert dropped == pytest.approx(0.24)
    # Exactly k entries, all text: kept as they are, most probable first.
    texts, logprobs, dropped = parse_top_logprobs([(" b", -2.0), (" c", -1.0)], k=2)
    assert texts == [" c", " b"] and logprobs == [-1.0, -2.0] and dropped == 0.0
    # OpenAI's names for partial UTF-8 tokens are not text either.
    assert parse_top_logprobs([("bytes:\\xe2\\x80", -0.1), (" d", -3.0)], k=2)[0] == [" d"]


def test_step_entries_read_both_reply_shapes_and_keep_duplicate_keys():
    from models.decoding.upstream import _Pairs, step_entries

    legacy = json.loads('{"logprobs": {"top_logprobs": [{" a": -1.0, "": -2.0, "": -3.0}]}}', object_pairs_hook=_Pairs)
    assert step_entries(legacy) == [(" a", -1.0), ("", -2.0), ("", -3.0)]
    content = {"logprobs": {"content": [{"token": " a", "logprob": -0.5,
                                         "top_logprobs": [{"token": " a", "logprob": -0.5}, {"token": " b", "logprob": -1.5}]}]}}
    assert step_entries(content) == [(" a", -0.5), (" b", -1.5)]
    assert step_entries({"logprobs": None}) is None
    assert step_entries({"logprobs": {"tokens": [], "top_logprobs": []}}) is None     # llama-cpp-python at EOS


# ---------------------------------------------------------------------------- a canned local server

class Canned(BaseHTTPRequestHandler):
    """Answers every POST with the next canned reply, a body (200) or (status, body); records the
    request bodies."""

    replies: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802 - the http.server API
        self.seen.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        reply = self.replies.pop(0)
        status, body = reply if isinstance(reply, tuple) else (200, reply)
        body = body.encode()
        self.send_response(status)
        if status == 429:
            self.send_header("retry-after", "0")      # the client's backoff, without the wait
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def canned():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Canned.replies, Canned.seen = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def completion(logprobs, finish_reason="length", text=" x"):
    return json.dumps({"id": "c", "object": "text_completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
                       "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}})


def test_client_parses_replies_detects_the_eos_step_and_names_a_server_without_logprobs(canned):
    from models.decoding.upstream import UpstreamClient, UpstreamConfig, UpstreamError

    client = UpstreamClient(UpstreamConfig(canned, "tiny", top_k=2, max_retries=0, eos_token_id=0))
    # Duplicate keys in the raw JSON (two byte pieces that both decode to ""), and k + 1 entries.
    Canned.replies = ['{"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [{"index": 0, '
                      '"text": " q", "finish_reason": "length", "logprobs": {"tokens": [" q"], "token_logprobs": [-4.0], '
                      '"top_logprobs": [{" p": -0.5, "": -1.5, "": -2.0, " q": -4.0}]}}], '
                      '"usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}}',
                      completion({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}, "stop", ""),
                      completion(None)]
    step = client.step("Hello", seed=3)
    assert step.texts == [" p"] and step.logprobs == [-0.5] and step.dropped_mass == pytest.approx(math.exp(-1.5))
    assert not step.stopped and step.prompt_tokens == 7
    sent = Canned.seen[0]
    assert (sent["prompt"], sent["max_tokens"], sent["logprobs"], sent["temperature"]) == ("Hello", 1, 2, 1.0)
    assert sent["logit_bias"] == {"0": -100} and sent["seed"] == 3 and sent["model"] == "tiny"
    assert client.step("Hello").stopped                       # EOS drawn, no logprobs: the end, detected
    with pytest.raises(UpstreamError, match=f"{canned}.*'tiny'.*no logprobs"):
        client.step("Hello")
    assert (client.requests, client.prompt_tokens) == (3, 21)


def test_rate_limits_and_transient_5xx_are_retried_by_the_openai_client(canned):
    from models.decoding.upstream import UpstreamClient, UpstreamConfig, UpstreamError

    error = json.dumps({"error": {"message": "slow down", "type": "rate_limit", "param": None, "code": None}})
    top = {"tokens": [" p"], "token_logprobs": [-0.5], "top_logprobs": [{" p": -0.5, " q": -1.0}]}
    client = UpstreamClient(UpstreamConfig(canned, "tiny", top_k=2, max_retries=2, timeout=5))
    Canned.replies = [(429, error), (503, error), completion(top)]
    step = client.step("Hello")
    assert step.texts == [" p", " q"] and len(Canned.seen) == 3       # two retries, then the answer
    assert client.requests == 1                                       # one step, however many attempts
    Canned.replies, Canned.seen = [(500, error), (502, error)], []
    once = UpstreamClient(UpstreamConfig(canned, "tiny", top_k=2, max_retries=1, timeout=5))
    with pytest.raises(UpstreamError, match=r"\(model 'tiny'\) still answered HTTP 502 after 1 retries"):
        once.step("Hello")
    assert len(Canned.seen) == 2
    # A 4xx other than 408/409/429 is the request's fault: not retried.
    Canned.replies, Canned.seen = [(400, error)], []
    with pytest.raises(UpstreamError, match="refused a request for logprobs=2: HTTP 400"):
        client.step("Hello")
    assert len(Canned.seen) == 1


def test_an_unreachable_upstream_is_a_clear_error():
    from models.decoding.upstream import UpstreamClient, UpstreamConfig, UpstreamError

    client = UpstreamClient(UpstreamConfig("http://127.0.0.1:9/v1", "tiny", max_retries=1, timeout=2))
    with pytest.raises(UpstreamError, match=r"127.0.0.1:9/v1 \(model 'tiny'\) did not answer after 1 retries"):
        client.step("Hello")


# ---------------------------------------------------------------------------- `vas serve` as the upstream

@pytest.fixture(scope="module")
def data_dir(smoke_world, tmp_path_factory):
    """The smoke world's models in a data folder of this module's own."""
    src = smoke_world["data_dir"]
    data = tmp_path_factory.mktemp("upstream-data")
    for name in ("base_model", "reward_models", "prompts"):
        (data / name).symlink_to(src / name, target_is_directory=True)
    shutil.copytree(src / "value_models", data / "value_models")
    return data


@pytest.fixture(scope="module")
def vas_upstream(data_dir):
    """`vas serve` on loopback as the upstream, serving the base model: {"base_url", "model", "engine"}."""
    from models.serving.serving import Engine
    from orchestration.serve import background_server

    engine = Engine(data_dir, device="cpu")
    with background_server(engine) as url:
        yield {"base_url": url, "model": "vas", "engine": engine}


@pytest.fixture(scope="module", params=["vas-serve", pytest.param("llamacpp", marks=pytest.mark.llamacpp)])
def upstream(request, data_dir):
    """An OpenAI-compatible upstream serving the smoke world's base model: {"base_url", "model"}."""
    if request.param == "vas-serve":
        return request.getfixturevalue("vas_upstream")
    try:
        serve = request.getfixturevalue("llamacpp")
    except pytest.FixtureLookupError:
        pytest.skip("no llamacpp fixture in tests/conftest.py (issue 11 part 3)")
    return {"base_url": serve(data_dir / "base_model").url + "/v1", "model": "base"}


def client_for(upstream, top_k=5):
    from models.decoding.upstream import UpstreamClient, UpstreamConfig

    return UpstreamClient(UpstreamConfig(upstream["base_url"], upstream["model"], top_k=top_k, max_retries=0))


def base_top_logprobs(engine, text: str, k: int):
    """pi0's top-k (token, logprob) after `text`, from a forward pass of the local weights."""
    import torch

    from models.lm.sampling import encode_prompts

    ids = torch.tensor(encode_prompts(engine.tokenizer, [text]))
    with torch.no_grad():
        logp = torch.log_softmax(engine.base(input_ids=ids).logits[0, -1].float(), -1)
    values, top = logp.topk(k)
    return [(engine.tokenizer.decode([t]), v) for t, v in zip(top.tolist(), values.tolist())]


def test_vas_serve_returns_the_base_models_top_logprobs(vas_upstream):
    upstream = vas_upstream
    import openai

    engine = upstream["engine"]
    client = openai.OpenAI(base_url=upstream["base_url"], api_key="unused", max_retries=0)
    reply = client.completions.create(model="vas", prompt=PROMPT, max_tokens=6, logprobs=5, seed=2)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == choice.model_extra["vas"]["n_tokens"] + (choice.finish_reason == "stop")
    first = base_top_logprobs(engine, PROMPT, 5)
    assert list(lp.top_logprobs[0]) == [t for t, _ in first]
    assert list(lp.top_logprobs[0].values()) == pytest.approx([v for _, v in first], abs=1e-5)
    assert lp.text_offset[0] == len(PROMPT)
    text_tokens = lp.tokens[: choice.model_extra["vas"]["n_tokens"]]
    assert "".join(text_tokens) == choice.text
    # Completions that stopped list their EOS step last, with pi0's log-probability of EOS there.
    stopped = [c for c in client.completions.create(model="vas", prompt=PROMPT, max_tokens=24, n=16, logprobs=1,
                                                    seed=0).choices if c.finish_reason == "stop"]
    assert stopped, "some smoke-world completions end within 24 tokens"
    for c in stopped:
        assert c.logprobs.tokens[-1] == engine.tokenizer.eos_token and c.logprobs.token_logprobs[-1] < 0
        assert c.logprobs.text_offset[-1] == len(PROMPT) + len(c.text)
    for bad in (21, -1):
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            client.completions.create(model="vas", prompt=PROMPT, max_tokens=2, logprobs=bad)
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.completions.create(model="vas", prompt=PROMPT, max_tokens=2, logprobs=2, stream=True)


def test_the_client_reads_the_upstreams_top_k(vas_upstream):
    upstream = vas_upstream
    engine = upstream["engine"]
    client = client_for(upstream, top_k=8)
    step = client.step(PROMPT)
    expected = base_top_logprobs(engine, PROMPT, 8)
    keep = [(t if t != engine.tokenizer.eos_token else None, v) for t, v in expected if "\ufffd" not in t]
    assert step.texts == [t for t, _ in keep] and step.logprobs == pytest.approx([v for _, v in keep], abs=1e-5)
    assert step.dropped_mass == pytest.approx(sum(math.exp(v) for t, v in expected if "\ufffd" in t), abs=1e-6)
    assert client.requests == 1 and step.prompt_tokens == len(engine.tokenizer(PROMPT)["input_ids"]) + 1


# ---------------------------------------------------------------------------- black-box VAS

def test_zero_weights_draw_from_the_renormalized_base_top_k(upstream, data_dir):
    """Many one-token draws at one state against the closed form softmax(top-k logprobs / T)."""
    import torch

    from models.decoding.blackbox import blackbox_rows
    from models.decoding.generate import decode_configs, value_tokenizer
    from models.value.value_model import ValueModel
    from models.value.value_store import find_value_models

    tokenizer = value_tokenizer(data_dir / "base_model")
    models = {name: ValueModel.load(path) for name, path in find_value_models(data_dir / "value_models").items()}
    client = client_for(upstream, top_k=5)
    step = client.step(PROMPT)
    k, draws, temperature = len(step.texts), 1500, 0.25
    expected = torch.softmax(torch.tensor(step.logprobs) / temperature, -1)
    sampling, vas = decode_configs(seed=11, max_new_tokens=1, temperature=temperature, top_k=5)
    rows = blackbox_rows(client, tokenizer, [PROMPT] * draws, models, {name: 0 for name in models}, sampling, vas)
    # A row the upstream ended by its own EOS draw (llama-cpp-python: no logprobs then) is not a draw
    # from the candidates; the others are, conditioned on not ending there.
    drawn = [row["completion"] if row["completion"] or not row["finished"] else None
             for row in rows if not row["upstream"]["stopped"]]
    counts = torch.tensor([drawn.count(text) for text in step.texts], dtype=torch.float64)
    draws = len(drawn)
    assert counts.sum() == draws > 1400                        # every draw is one of the top-k candidates
    assert all(row["kl_nats"] == 0.0 for row in rows)
    assert all(row["upstream"]["requests"] == 1 for row in rows) and client.requests == len(rows) + 1

    def chi2(p):
        return float(((counts - draws * p) ** 2 / (draws * p)).sum())

    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[k - 1]     # p = 0.001
    assert chi2(expected) < critical
    # The test has power (the smoke base model is nearly flat here, hence the low temperature): a
    # sampler that forgot the temperature, or ignored the logprobs (uniform), fails it.
    assert chi2(torch.softmax(torch.tensor(step.logprobs), -1)) > critical
    assert chi2(torch.full((k,), 1 / k, dtype=torch.float64)) > critical


def held_out_prompts(data_dir):
    import pandas as pd

    prompts = pd.read_parquet(data_dir / "prompts" / "prompts.parquet")
    return prompts[prompts.split == "eval"].prompt.tolist()


def reward_as_value_model(scorer):
    """A scalar value model made of the learned reward model itself (its body and score head, copied):
    V(text) is the reward head read at the text's last token, so Q(s, a) = r(s·a), the learned
    reward of the text so far. Its effect is known by construction; the smoke world's trained value
    models (10 steps) are too weak to move the reward measurably."""
    import copy

    import torch

    from models.value.value_model import ValueModel

    model = ValueModel(copy.deepcopy(scorer.model.transformer), "scalar")
    with torch.no_grad():
        model.head.weight.copy_(scorer.model.score.weight)
    return model.eval()


def test_positivity_weight_raises_the_learned_positivity_reward(upstream, data_dir):
    import numpy as np

    from models.decoding.generate import decode_configs, decode_rows, reward_scorers, value_tokenizer

    scorer = reward_scorers(data_dir)["positivity"]
    tokenizer = value_tokenizer(data_dir / "base_model")        # the value model's own: read alone
    model = reward_as_value_model(scorer)
    prompts = [p for p in held_out_prompts(data_dir) for _ in range(16)]
    sampling, vas = decode_configs(seed=0, max_new_tokens=16, top_k=10)

    def run(weight):
        client = client_for(upstream, top_k=10)
        rows = decode_rows(None, tokenizer, prompts, {"positivity": model}, {"positivity": weight}, sampling, vas,
                           "cpu", {"positivity": scorer}, upstream=client)
        scores = np.array([row["learned_positivity"] for row in rows])
        tokens = sum(row["n_tokens"] for row in rows)
        assert client.requests == sum(row["upstream"]["requests"] for row in rows)
        return (scores.mean(), 1.96 * scores.std(ddof=1) / np.sqrt(len(scores)), scores.std(),
                client.requests / tokens, np.mean([row["kl_nats"] for row in rows]))

    base, base_ci, spread, _, base_kl = run(0.0)
    # The learned reward's scale is arbitrary (about 1e-3 here): the weight is 2 per reward spread.
    steered, steered_ci, _, per_token, kl = run(2.0 / spread)
    print(f"black-box base {base:.5f} ± {base_ci:.5f}, steered {steered:.5f} ± {steered_ci:.5f}, "
          f"KL {kl:.3f} nats, {per_token:.3f} requests per token")
    assert steered - steered_ci > base + base_ci
    assert base_kl == 0.0 and kl > 0
    assert 1.0 <= per_token <= 1.2          # one request per token, plus one per row that chose the end


def test_vas_serve_with_an_upstream_through_the_openai_client(upstream, data_dir):
    import openai

    from models.decoding.upstream import UpstreamConfig
    from models.serving.serving import Engine
    from orchestration.serve import background_server

    config = UpstreamConfig(upstream["base_url"], upstream["model"], top_k=6, max_retries=0)
    engine = Engine(data_dir, device="cpu", upstream=config)
    assert engine.base is None                                  # the base weights stay upstream
    name = sorted(engine.values.models)[0]
    with background_server(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        base = client.completions.create(model="vas", prompt=PROMPT, max_tokens=8, n=2, seed=5)
        info = base.model_extra["vas"]
        assert info["top_k"] == 6 and info["upstream"]["base_url"] == upstream["base_url"]
        assert info["upstream"]["requests"] == sum(c.model_extra["vas"]["upstream"]["requests"] for c in base.choices)
        assert info["upstream"]["requests_per_token"] == info["upstream"]["requests"] / base.usage.completion_tokens
        assert info["upstream"]["prompt_tokens_sent"] >= info["upstream"]["requests"] * base.usage.prompt_tokens // 2
        assert all(c.model_extra["vas"]["kl_nats"] == 0.0 for c in base.choices)

        body = dict(model="vas", prompt=PROMPT, max_tokens=8, seed=5, extra_body={"vas": {"weights": {name: 4}}})
        steered = client.completions.create(**body)
        assert steered.choices[0].model_extra["vas"]["kl_nats"] > 0
        assert set(steered.choices[0].model_extra["vas"]["learned"]) == set(engine.scorers)
        stream = list(client.completions.create(stream=True, **body))
        assert len([c for c in stream if c.choices and c.choices[0].text]) > 1           # token by token
        assert "".join(c.choices[0].text for c in stream if c.choices) == steered.choices[0].text

        with pytest.raises(openai.BadRequestError, match="local base model"):
            client.completions.create(model="vas", prompt=PROMPT, max_tokens=2, logprobs=2)


def test_vas_generate_with_an_upstream(upstream, data_dir, capsys):
    from orchestration.cli import main

    argv = ["generate", "--prompt", PROMPT, "--n", "2", "--max-new-tokens", "5", "--seed", "3", "--json",
            "--data-dir", str(data_dir), "--device", "cpu", "--upstream", upstream["base_url"],
            "--upstream-model", upstream["model"], "--upstream-top-k", "4", "--upstream-retries", "0"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all(row["upstream"]["requests"] >= row["n_tokens"] for row in rows)
    assert main(["generate", "--prompt", PROMPT, "--data-dir", str(data_dir), "--upstream", "http://127.0.0.1:9/v1"]) == 2
    assert "needs --upstream-model" in capsys.readouterr().err


def test_the_upstream_calls_of_a_step_fly_together_and_change_no_token(vas_upstream, data_dir):
    """A step's requests for all rows go out at once (up to the client's concurrency); the rows get
    the tokens they get one request at a time, and several black-box requests may run at once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from models.decoding.blackbox import blackbox_rows
    from models.decoding.generate import decode_configs, value_tokenizer
    from models.decoding.upstream import UpstreamClient, UpstreamConfig
    from models.value.value_model import ValueModel
    from models.value.value_store import find_value_models

    tokenizer = value_tokenizer(data_dir / "base_model")
    models = {name: ValueModel.load(path) for name, path in find_value_models(data_dir / "value_models").items()}
    weights = {sorted(models)[0]: 2.0}
    prompts = held_out_prompts(data_dir)[:4]
    sampling, vas = decode_configs(seed=3, max_new_tokens=6, top_k=5)

    class Watching(UpstreamClient):
        """Counts the calls in flight at once."""

        def __init__(self, config):
            super().__init__(config)
            self.now = self.peak = 0
            self.lock = threading.Lock()

        def step(self, *args, **kwargs):
            with self.lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                return super().step(*args, **kwargs)
            finally:
                with self.lock:
                    self.now -= 1

    def client(concurrency):
        return Watching(UpstreamConfig(vas_upstream["base_url"], "vas", top_k=5, max_retries=0, concurrency=concurrency))

    one, many = client(1), client(8)
    alone = blackbox_rows(one, tokenizer, prompts, models, weights, sampling, vas)
    together = blackbox_rows(many, tokenizer, prompts, models, weights, sampling, vas)
    assert one.peak == 1 and many.peak > 1
    assert [r["completion"] for r in together] == [r["completion"] for r in alone]
    assert [r["kl_nats"] for r in together] == pytest.approx([r["kl_nats"] for r in alone], abs=1e-6)
    assert many.requests == one.requests == sum(r["upstream"]["requests"] for r in alone)
    # Two requests decoding at once on one client: each as it is alone.
    shared = client(8)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda ps: blackbox_rows(shared, tokenizer, ps, models, weights, sampling, vas),
                                [prompts[:2], prompts[2:]]))
    assert [[r["completion"] for r in part] for part in results] == [
        [r["completion"] for r in blackbox_rows(one, tokenizer, ps, models, weights, sampling, vas)]
        for ps in (prompts[:2], prompts[2:])]
    with pytest.raises(ValueError, match="concurrency"):
        UpstreamConfig("http://127.0.0.1:1/v1", "vas", concurrency=0)
