"""`vas serve`: the OpenAI-compatible server on the smoke world, through FastAPI's TestClient and,
once, through uvicorn on loopback with the official openai client."""

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from models.artifacts import visible_subfolders  # noqa: E402

PROMPT = "The movie was"


@pytest.fixture(scope="module")
def served(smoke_world, tmp_path_factory):
    """An Engine over a data folder of its own: the smoke world's base and reward models (linked) and
    a copy of its value models, which the swap test replaces."""
    from models.serving.serving import Engine
    from orchestration.serve import create_app

    src = smoke_world["data_dir"]
    data_dir = tmp_path_factory.mktemp("serve-data")
    for name in ("base_model", "reward_models"):
        (data_dir / name).symlink_to(src / name, target_is_directory=True)
    shutil.copytree(src / "value_models", data_dir / "value_models")
    engine = Engine(data_dir, device="cpu")
    with TestClient(create_app(engine)) as client:
        yield {"engine": engine, "client": client, "data_dir": data_dir}


def post(client, **body):
    return client.post("/v1/completions", json={"model": "vas", "prompt": PROMPT, **body})


def reward_names(served):
    names = sorted(served["engine"].values.models)
    assert names, "the smoke world has value models"
    return names


def test_models_lists_the_served_model(served):
    body = served["client"].get("/v1/models").json()
    assert [m["id"] for m in body["data"]] == ["vas"] and body["object"] == "list"


def test_no_vas_field_and_zero_weights_are_exactly_base_sampling(served):
    from models.lm.sampling import SamplingConfig, sample

    engine = served["engine"]
    expected = sample(engine.base, engine.tokenizer, [PROMPT] * 3,
                      SamplingConfig(max_new_tokens=12, temperature=0.9, seed=7), device="cpu")
    zero = {name: 0 for name in reward_names(served)}
    for extra in ({}, {"vas": {"weights": zero}}):
        body = post(served["client"], n=3, max_tokens=12, temperature=0.9, seed=7, **extra).json()
        assert [c["text"] for c in body["choices"]] == expected.texts
        assert [c["vas"]["kl_nats"] for c in body["choices"]] == [0.0, 0.0, 0.0]
        assert body["usage"]["completion_tokens"] == sum(expected.n_tokens)
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + sum(expected.n_tokens)
        assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1, 2]


def test_steered_completions_report_kl_learned_rewards_and_version(served):
    from models.artifacts import dvc_md5

    names = reward_names(served)
    weights = {names[0]: 4.0}
    body = post(served["client"], n=2, max_tokens=10, seed=1, vas={"weights": weights, "top_k": 10, "min_p": 0}).json()
    assert body["vas"]["value_model_version"] == dvc_md5(served["data_dir"] / "value_models").removesuffix(".dir")
    assert body["vas"]["weights"] == weights and body["vas"]["top_k"] == 10 and body["vas"]["min_p"] == 0
    for choice in body["choices"]:
        assert choice["vas"]["kl_nats"] > 0
        assert set(choice["vas"]["learned"]) == {p.name for p in visible_subfolders(served["data_dir"] / "reward_models")}


def test_calibrated_steering_needs_calibrated_bins(served):
    names = reward_names(served)
    calibrated = [n for n in names if getattr(served["engine"].values.models[n].support, "calibrated", False)]
    plain = [n for n in names if n.endswith(".scalar")]
    assert calibrated and plain, "the smoke world has a calibrated distributional model and the scalar baseline"
    request = dict(n=2, max_tokens=10, seed=1)
    steered = post(served["client"], vas={"weights": {calibrated[0]: 4.0}, "calibrated": True}, **request).json()
    assert steered["vas"]["calibrated"] is True and all(c["vas"]["kl_nats"] > 0 for c in steered["choices"])
    refused = post(served["client"], vas={"weights": {plain[0]: 4.0}, "calibrated": True}, **request)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "vas.calibrated"
    # Calibrated steering is by the mean normal score whatever "soft" says.
    soft_too = post(served["client"], vas={"weights": {calibrated[0]: 4.0}, "calibrated": True, "soft": True},
                    **request).json()
    assert [c["text"] for c in soft_too["choices"]] == [c["text"] for c in steered["choices"]]
    assert steered["vas"]["soft"] is False
    not_a_bool = post(served["client"], vas={"weights": {calibrated[0]: 4.0}, "calibrated": "false"}, **request)
    assert not_a_bool.status_code == 400 and not_a_bool.json()["error"]["param"] == "vas.calibrated"


@pytest.mark.parametrize("body, status, param", [
    ({"vas": {"weights": {"no_such_reward": 1}}}, 400, "vas.weights"),
    ({"max_tokens": -3}, 400, "max_tokens"),
    ({"max_tokens": 10**9}, 400, "max_tokens"),
    ({"prompt": "word " * 5000}, 400, "prompt"),
    ({"model": "gpt-4"}, 404, "model"),
    ({"n": 0}, 400, "n"),
    ({"temperature": 0}, 400, "temperature"),
    ({"vas": {"min_p": 1.0}}, 400, "vas.min_p"),
    ({"vas": {"min_p": -0.1}}, 400, "vas.min_p"),
    ({"vas": {"min_q": 0.1}}, 400, "vas"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"stop": 3}, 400, "stop"),
])
def test_bad_requests_get_openai_error_bodies(served, body, status, param):
    client = served["client"]
    response = client.post("/v1/completions", json={"model": "vas", "prompt": PROMPT, **body})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "Traceback" not in error["message"]
    assert client.get("/v1/models").status_code == 200      # still up


@pytest.mark.parametrize("raw", ['{"model": "vas", "prompt": "a", "vas": {"weights": {"NAME": Infinity}}}',
                                 '{"model": "vas", "prompt": "a", "vas": {"weights": {"NAME": 1e999}}}',
                                 '{"model": "vas", "prompt": "a", "vas": {"weights": {"NAME": "2"}}}',
                                 'not json'])
def test_non_finite_or_non_numeric_weights_and_bad_json_are_400(served, raw):
    raw = raw.replace("NAME", reward_names(served)[0])
    response = served["client"].post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_streaming_sends_sse_chunks_that_add_up_to_the_completion(served):
    names = reward_names(served)
    request = dict(n=2, max_tokens=12, seed=4, vas={"weights": {names[0]: 3}})
    whole = post(served["client"], **request).json()
    response = post(served["client"], stream=True, **request)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[-1]["usage"] == whole["usage"]
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]]
        assert len(mine) > 2                                   # token by token
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"] and mine[-1]["vas"]["kl_nats"] == choice["vas"]["kl_nats"]
    bad = post(served["client"], stream=True, max_tokens=-1)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_a_new_value_model_version_is_picked_up_without_restart(served):
    from models.artifacts import atomic_path, dvc_md5

    root = served["data_dir"] / "value_models"
    before = post(served["client"], max_tokens=4, seed=0).json()["vas"]["value_model_version"]
    with atomic_path(root) as tmp:        # what a retrain does: a new folder renamed over the old one
        shutil.copytree(root, tmp)
        meta = next(tmp.glob("*/vas_value.json"))
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "note": "retrained"}))
    after = post(served["client"], max_tokens=4, seed=0, vas={"weights": {reward_names(served)[0]: 1}}).json()
    assert after["vas"]["value_model_version"] != before
    assert after["vas"]["value_model_version"] == dvc_md5(root).removesuffix(".dir")
    assert after["choices"][0]["vas"]["kl_nats"] > 0


@pytest.fixture
def http_server(served):
    from orchestration.serve import background_server

    with background_server(served["engine"]) as url:
        yield url


def test_the_openai_client_over_http(served, http_server):
    import openai

    client = openai.OpenAI(base_url=http_server, api_key="unused", max_retries=0, timeout=60)
    name = reward_names(served)[0]
    assert [m.id for m in client.models.list()] == ["vas"]

    base = client.completions.create(model="vas", prompt=PROMPT, max_tokens=10, seed=5)
    assert base.choices[0].model_extra["vas"]["kl_nats"] == 0.0
    assert base.usage.completion_tokens == base.choices[0].model_extra["vas"]["n_tokens"]

    steered = client.completions.create(model="vas", prompt=PROMPT, max_tokens=10, seed=5,
                                        extra_body={"vas": {"weights": {name: 4}, "top_k": 10}})
    assert steered.choices[0].model_extra["vas"]["kl_nats"] > 0

    # Streaming: the chunks add up to the same completion as the same request without streaming.
    stream = client.completions.create(model="vas", prompt=PROMPT, max_tokens=10, seed=5, stream=True,
                                       extra_body={"vas": {"weights": {name: 4}, "top_k": 10}})
    chunks = list(stream)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1      # token by token
    assert "".join(c.choices[0].text for c in chunks if c.choices) == steered.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == steered.choices[0].finish_reason

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="vas", prompt=PROMPT, max_tokens=-1)

    # 16 concurrent requests, each with its own prompt, weights and seed, get what they get one at a time.
    words = ["good", "bad", "long", "short"]
    requests = [dict(prompt=f"{PROMPT} {words[i % 4]} {i}", seed=i, max_tokens=8,
                     extra_body={"vas": {"weights": {name: [0, 3, 1, 6][i % 4]}}}) for i in range(16)]
    one_at_a_time = [client.completions.create(model="vas", **r).choices[0].text for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: client.completions.create(model="vas", **r).choices[0].text, requests))
    assert together == one_at_a_time


def test_bad_requests_over_http_get_their_4xx_and_the_server_stays_up(served, http_server):
    import openai

    client = openai.OpenAI(base_url=http_server, api_key="unused", max_retries=0, timeout=60)
    name = reward_names(served)[0]
    bad = [
        (dict(prompt=PROMPT, extra_body={"vas": {"weights": {"no_such_reward": 1}}}), openai.BadRequestError, "vas.weights"),
        # The openai client refuses to send a non-finite number itself (not JSON); a string is the bad weight here.
        (dict(prompt=PROMPT, extra_body={"vas": {"weights": {name: "2"}}}), openai.BadRequestError, f"vas.weights.{name}"),
        (dict(prompt=PROMPT, max_tokens=-3), openai.BadRequestError, "max_tokens"),
        (dict(prompt=PROMPT, max_tokens=10**9), openai.BadRequestError, "max_tokens"),
        (dict(prompt="word " * 5000), openai.BadRequestError, "prompt"),
    ]
    for request, error, param in bad:
        with pytest.raises(error) as raised:
            client.completions.create(model="vas", **request)
        body = raised.value.body
        assert "Traceback" not in body["message"] and body["param"] == param
        assert [m.id for m in client.models.list()] == ["vas"]          # still up
    assert client.completions.create(model="vas", prompt=PROMPT, max_tokens=4, seed=1).choices[0].text is not None


def test_a_hot_swap_mid_traffic_loses_no_request(served, http_server):
    """Four clients keep sending requests while a new version replaces data/value_models: every
    request is answered, each client sees the old version, then the new one, never back again."""
    import threading

    import openai

    from models.artifacts import atomic_path

    client = openai.OpenAI(base_url=http_server, api_key="unused", max_retries=0, timeout=60)
    root = served["data_dir"] / "value_models"
    body = dict(model="vas", prompt=PROMPT, max_tokens=6, extra_body={"vas": {"weights": {reward_names(served)[0]: 2}}})
    before = client.completions.create(**body).model_extra["vas"]["value_model_version"]
    swapped = threading.Event()
    answered = [0] * 4

    def traffic(i: int) -> list:
        replies, seed = [], i
        # Until the swap, then at least three more: traffic flows on both sides of it.
        while not swapped.is_set() or sum(r.model_extra["vas"]["value_model_version"] != before for r in replies) < 3:
            replies.append(client.completions.create(seed=seed, **body))
            answered[i] += 1
            seed += 4
        return replies

    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(traffic, i) for i in range(4)]
        deadline = time.monotonic() + 60
        while min(answered) < 2 and time.monotonic() < deadline:    # every client is sending
            time.sleep(0.01)
        with atomic_path(root) as tmp:
            shutil.copytree(root, tmp)
            meta = next(tmp.glob("*/vas_value.json"))
            meta.write_text(json.dumps({**json.loads(meta.read_text()), "note": "mid-traffic"}))
        swapped.set()
        per_client = [c.result(timeout=120) for c in clients]
    after = client.completions.create(seed=0, **body).model_extra["vas"]["value_model_version"]
    assert after != before
    for replies in per_client:
        versions = [r.model_extra["vas"]["value_model_version"] for r in replies]
        assert versions[0] == before and versions[-1] == after and set(versions) == {before, after}
        switched = versions.index(after)
        assert versions[switched:] == [after] * (len(versions) - switched)      # never back to the old one
        assert all(r.choices[0].text is not None and r.choices[0].model_extra["vas"]["kl_nats"] >= 0 for r in replies)
