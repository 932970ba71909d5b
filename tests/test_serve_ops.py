"""`vas serve`'s protocol and operational surface on the smoke world: stop sequences, chat
completions, the API key, the queue bound, /health, /metrics, request timeouts, X-Request-Id,
and a SIGTERM that drains a streaming request (a real `vas serve` process)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

PROMPT = "The movie was"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def engine(smoke_world):
    from models.serving.serving import Engine

    engine = Engine(smoke_world["data_dir"], device="cpu")
    yield engine
    engine.close()


def app_client(engine, **options):
    from orchestration.serve import ServeOptions, create_app

    return TestClient(create_app(engine, ServeOptions(**options)))


def completion(client, path="/v1/completions", **body):
    base = {"model": "vas", "max_tokens": 24, "seed": 3, "temperature": 1.3}
    return client.post(path, json={**base, **({"prompt": PROMPT} if "messages" not in body else {}), **body})


def stream_text(client, path="/v1/completions", **body):
    """The text a streamed request sends, its finish_reason, and its chunks."""
    with client.stream("POST", path, json={"model": "vas", "max_tokens": 24, "seed": 3, "temperature": 1.3,
                                           "stream": True, **body}) as response:
        assert response.status_code == 200
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    text = "".join(c.get("text") or c.get("delta", {}).get("content") or "" for c in choices)
    return text, choices[-1]["finish_reason"], chunks


def test_stop_ends_a_completion_before_the_stop_string_streamed_or_not(engine):
    with app_client(engine) as client:
        free = completion(client).json()["choices"][0]
        text = free["text"]
        assert len(text) > 8, "the smoke model must say something"
        stop = text[4:7]                      # some characters the unconstrained completion holds
        cut = text[:text.find(stop)]
        stopped = completion(client, stop=[stop, "never seen"]).json()["choices"][0]
        assert stopped["text"] == cut and stopped["finish_reason"] == "stop"
        assert stopped["vas"]["n_tokens"] <= free["vas"]["n_tokens"]
        streamed, reason, _ = stream_text(client, prompt=PROMPT, stop=stop)
        assert streamed == cut and reason == "stop"
        # A stop string that never appears changes nothing.
        assert completion(client, stop="zzzzzz").json()["choices"][0] == free


def test_chat_completions_use_the_tokenizers_template_or_refuse(engine):
    import openai

    from orchestration.serve import background_server

    messages = [{"role": "user", "content": "Tell me about the kettle."}]
    with app_client(engine) as client:
        refused = completion(client, "/v1/chat/completions", messages=messages)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "chat_template_missing"
    engine.tokenizer.chat_template = TEMPLATE
    try:
        prompt = "user: Tell me about the kettle.\nassistant:"
        name = sorted(engine.values.models)[0]
        steer = {"vas": {"weights": {name: 2.0}, "top_k": 10}}
        with app_client(engine) as client:
            plain = completion(client, prompt=prompt, **steer).json()["choices"][0]
            chat = completion(client, "/v1/chat/completions", messages=messages, **steer).json()
            assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
            assert chat["choices"][0]["message"] == {"role": "assistant", "content": plain["text"]}
            assert plain["vas"]["kl_nats"] > 0
            assert chat["choices"][0]["vas"]["kl_nats"] == pytest.approx(plain["vas"]["kl_nats"], abs=1e-5)
            streamed, reason, chunks = stream_text(client, "/v1/chat/completions", messages=messages, **steer)
            assert streamed == plain["text"] and reason == plain["finish_reason"]
            assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
            bad = completion(client, "/v1/chat/completions", messages=[{"role": "user"}])
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[0]"
        with background_server(engine) as url:       # the official client, over HTTP
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
            reply = client.chat.completions.create(model="vas", messages=messages, max_tokens=24, seed=3,
                                                   temperature=1.3, extra_body=steer)
            assert reply.choices[0].message.content == plain["text"]
    finally:
        engine.tokenizer.chat_template = None


def test_the_api_key_guards_v1_but_not_health_or_metrics(engine):
    import openai

    from orchestration.serve import ServeOptions, background_server

    with app_client(engine, api_key="sesame") as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = client.post("/v1/completions", json={"model": "vas", "prompt": PROMPT}, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        ok = client.post("/v1/completions", json={"model": "vas", "prompt": PROMPT, "max_tokens": 2},
                         headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
        assert 'vas_requests_rejected_total{reason="unauthorized"} 3.0' in client.get("/metrics").text
    with background_server(engine, options=ServeOptions(api_key="sesame")) as url:
        good = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0, timeout=60)
        assert good.completions.create(model="vas", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="nope", max_retries=0).completions.create(model="vas", prompt=PROMPT)


def test_past_the_queue_bound_requests_get_429_with_retry_after(engine):
    from orchestration.serve_ops import ServerMetrics

    with app_client(engine, max_queued=0) as client:
        for stream in (False, True):
            response = client.post("/v1/completions", json={"model": "vas", "prompt": PROMPT, "stream": stream})
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "rate_limit_error"
        assert 'vas_requests_rejected_total{reason="queue_full"} 2.0' in client.get("/metrics").text
    # The bound counts requests in flight beyond the running ones.
    metrics = ServerMetrics(lambda: engine)
    metrics.in_flight = 3                          # none is in the batch: all 3 wait
    with pytest.raises(Exception, match="3 requests waiting"):
        with metrics.admitted(max_queued=3):
            pass
    with metrics.admitted(max_queued=4):
        assert metrics.in_flight == 4
    assert metrics.in_flight == 3


def test_health_is_503_while_loading_then_200(smoke_world):
    from models.serving.serving import Engine
    from orchestration.serve import create_app

    release = threading.Event()

    def load():
        release.wait(30)
        return Engine(smoke_world["data_dir"], device="cpu")

    with TestClient(create_app(load)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["error"]["message"] == "Loading model"
        assert client.post("/v1/completions", json={"model": "vas", "prompt": PROMPT}).status_code == 503
        release.set()
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/health").json() == {"status": "ok"}
        assert completion(client, max_tokens=2).status_code == 200

    def fail():
        raise OSError("no such model")

    with TestClient(create_app(fail)) as client:
        deadline = time.monotonic() + 10
        while "no such model" not in client.get("/health").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/health").status_code == 503


def test_metrics_count_tokens_requests_and_latencies(engine):
    with app_client(engine) as client:
        bodies = [completion(client, seed=s, max_tokens=6).json() for s in range(3)]
        streamed, _, _ = stream_text(client, prompt=PROMPT, max_tokens=6)
        text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    lines = dict(line.rsplit(" ", 1) for line in text.text.splitlines() if line and not line.startswith("#"))
    tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
    assert float(lines["vas_generation_tokens_total"]) >= tokens + 1
    assert float(lines['vas_request_success_total{endpoint="completions"}']) == 4
    assert float(lines["vas_time_to_first_token_seconds_count"]) == 4
    assert float(lines["vas_e2e_request_latency_seconds_count"]) == 4
    assert float(lines["vas_num_requests_running"]) == 0 and float(lines["vas_num_requests_waiting"]) == 0
    timing = bodies[0]["vas"]["timing"]
    assert 0 < timing["time_to_first_token_s"] <= timing["latency_s"]


def test_a_request_past_its_timeout_gets_408_and_leaves_the_batch(engine):
    with app_client(engine, request_timeout=0.001) as client:
        response = completion(client, max_tokens=40)
        assert response.status_code == 408 and response.json()["error"]["code"] == "request_timeout"
    with app_client(engine) as client:                 # the engine serves on, with an empty batch
        assert completion(client, max_tokens=4).status_code == 200
    deadline = time.monotonic() + 10
    while engine.scheduler.counts() != (0, 0):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_x_request_id_is_echoed_or_generated(engine):
    with app_client(engine) as client:
        assert client.get("/v1/models", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
        generated = client.get("/v1/models").headers["x-request-id"]
        assert len(generated) == 32 and generated != client.get("/v1/models").headers["x-request-id"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_drains_a_streaming_request_to_its_end(smoke_world):
    port = free_port()
    env = {**os.environ, "VAS_DATA_DIR": str(smoke_world["data_dir"])}
    server = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "serve", "--port", str(port),
                               "--device", "cpu", "--shutdown-timeout", "60"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "vas serve did not become healthy"
                time.sleep(0.2)
        body = json.dumps({"model": "vas", "prompt": PROMPT, "max_tokens": 40, "seed": 1, "temperature": 1.5,
                           "stream": True}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        lines = []
        with urllib.request.urlopen(request, timeout=120) as stream:
            first = stream.readline().decode()
            assert first.startswith("data: {")
            server.send_signal(signal.SIGTERM)       # mid-stream
            lines = [first, *(line.decode() for line in stream)]
        events = [line for line in lines if line.startswith("data: ")]
        assert events[-1].strip() == "data: [DONE]"
        usage = json.loads(events[-2][6:])["usage"]
        assert usage["completion_tokens"] >= 1
        # uvicorn re-raises the SIGTERM it caught once it has shut down, so the exit is the signal's.
        assert server.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(OSError):                   # and nothing new is accepted
            urllib.request.urlopen(f"{url}/health", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
