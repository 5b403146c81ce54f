"""The HTTP API in-process (httpx via TestClient): every route, streaming, adapters chosen per
request, pyreft import end to end, and the JSON errors of bad input. Runs on the pyreft fixture
model so served tokens can be checked against pyreft's own outputs."""

import json
import re

import pytest

from server.adapters.pyreft import import_pyreft
from tests.api_utils import ADMIN, error_of, running_app, stream, tar_directory, upload
from tests.conftest import FIXTURE

EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
MAX_NEW = EXPECTED["max_new_tokens"]
MODEL_NAME = "model"  # the fixture model's directory name is its served name


def cases(adapter: str) -> list[dict]:
    return [c for c in EXPECTED["cases"] if c["adapter"] == adapter]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    with running_app(FIXTURE / "model", store, max_queue=64) as client:
        archive = tar_directory(FIXTURE / "adapters" / "lo_l14_f3l3_unshared")
        response = client.post(
            "/v1/adapters/lo14/pyreft",
            files={"archive": ("ckpt.tar.gz", archive)},
            data={"positions": "f3+l3", "share_weights": "false"},
            headers=ADMIN,
        )
        assert response.status_code == 201, response.text
        di = import_pyreft(FIXTURE / "adapters" / "di_l13_f1l2_unshared", positions="f1+l2", share_weights=False)
        assert upload(client, "di", di.to_bytes()).status_code == 201
        yield client


def generate(client, **body):
    response = client.post("/v1/generate", json={"max_new_tokens": MAX_NEW, "ignore_eos": True, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_health_ready_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    from importlib.metadata import version

    assert client.get("/version").json() == {"version": version("reft-server")}  # vLLM's route
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    long_prompt = "a prompt long enough to fill a few KV cache blocks, sent twice"
    generate(client, prompt=long_prompt, max_new_tokens=2)
    generate(client, prompt=long_prompt, max_new_tokens=2)  # its full blocks come from the prefix cache
    text = client.get("/metrics").text
    names = ("reft_requests_total", "reft_time_to_first_token_seconds_bucket", "reft_kv_cache_usage_ratio")
    for name in (*names, "reft_step_device_wait_seconds_total"):
        assert name in text
    hits = re.search(r"^reft_prefix_cache_hits_total (\S+)$", text, re.MULTILINE)
    assert hits and float(hits.group(1)) >= 48
    for kind in ("prefill", "decode"):  # each request: a step with its prompt, then one that decodes
        steps = re.search(rf'^reft_step_duration_seconds_count{{kind="{kind}"}} (\S+)$', text, re.MULTILINE)
        assert steps and float(steps.group(1)) >= 2, kind
        launched = re.search(
            rf'^reft_step_phase_seconds_total{{kind="{kind}",phase="launch"}} (\S+)$', text, re.MULTILINE
        )
        assert launched and float(launched.group(1)) > 0, kind
        on_cpu = re.search(rf'^reft_step_cpu_seconds_total{{kind="{kind}"}} (\S+)$', text, re.MULTILINE)
        assert on_cpu and float(on_cpu.group(1)) > 0, kind
    assert "x-request-id" in client.get("/health").headers


def test_an_engine_that_cannot_serve_refuses_requests_with_503(client, monkeypatch):
    runner = client.app.state.reft.engine.host.core.runner
    monkeypatch.setattr(runner, "problem", lambda: "tensor-parallel rank 1 exited")
    refused = client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 2})
    assert refused.status_code == 503 and "rank 1 exited" in error_of(refused)["message"]
    assert client.get("/ready").status_code == 503
    monkeypatch.undo()
    generate(client, prompt="hello", max_new_tokens=2)


@pytest.mark.parametrize("adapter, name", [("lo_l14_f3l3_unshared", "lo14"), ("di_l13_f1l2_unshared", "di")])
def test_served_tokens_equal_pyreft_for_uploaded_adapters(client, adapter, name):
    for case in cases(adapter):
        steered = generate(client, prompt=case["prompt"], adapter=name)
        assert steered["token_ids"] == case["adapter_tokens"]
        assert steered["adapter"] == {"name": name, "version": 1}
        assert (
            generate(client, input_ids=case["prompt_ids"], adapter=f"{name}@1")["token_ids"] == case["adapter_tokens"]
        )
        base = generate(client, prompt=case["prompt"])
        assert base["token_ids"] == case["base_tokens"] and "adapter" not in base
        assert base["usage"] == {
            "prompt_tokens": len(case["prompt_ids"]),
            "completion_tokens": MAX_NEW,
            "total_tokens": len(case["prompt_ids"]) + MAX_NEW,
        }


def test_streaming_equals_non_streaming(client):
    case = cases("lo_l14_f3l3_unshared")[0]
    body = {"prompt": case["prompt"], "adapter": "lo14", "max_new_tokens": MAX_NEW, "ignore_eos": True}
    events = stream(client, "/v1/generate", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [t for e in chunks for t in e["token_ids"]] == case["adapter_tokens"]
    assert all(e["finish_reason"] is None for e in chunks[:-1])
    final = chunks[-1]
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == MAX_NEW
    assert final["adapter"] == {"name": "lo14", "version": 1}
    whole = generate(client, **body)
    assert "".join(e["text"] for e in chunks) == whole["text"]


def test_logprobs(client):
    out = generate(client, prompt="Hello", max_new_tokens=3, logprobs=2)
    assert len(out["logprobs"]) == 3
    for entry, token in zip(out["logprobs"], out["token_ids"], strict=True):
        assert entry["token_id"] == token and entry["logprob"] <= 0
        assert [t["token_id"] for t in entry["top_logprobs"]][0] == token  # greedy takes the top token


def test_openai_completions_choose_the_adapter_by_model(client):
    case = cases("di_l13_f1l2_unshared")[1]
    body = {"prompt": case["prompt"], "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
    steered = client.post("/v1/completions", json={**body, "model": "di"}).json()
    base = client.post("/v1/completions", json={**body, "model": MODEL_NAME}).json()
    assert steered["object"] == "text_completion" and steered["model"] == "di"
    native_steered = generate(client, prompt=case["prompt"], adapter="di")
    native_base = generate(client, prompt=case["prompt"])
    assert steered["choices"][0]["text"] == native_steered["text"]
    assert base["choices"][0]["text"] == native_base["text"]
    assert native_steered["token_ids"] != native_base["token_ids"]
    assert steered["usage"]["completion_tokens"] == MAX_NEW


def test_openai_completions_batch_of_prompts_and_stream(client):
    prompts = [c["prompt"] for c in cases("lo_l14_f3l3_unshared")[:3]]
    body = {"model": "lo14", "prompt": prompts, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    out = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    events = stream(client, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    texts = ["", "", ""]
    for event in events[:-2]:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in out["choices"]]
    assert events[-2]["usage"]["completion_tokens"] == 15 and events[-2]["choices"] == []
    assert all(event["usage"] is None for event in events[:-2]), "as OpenAI's, the other chunks say null"


def test_logit_bias_and_penalties_reach_the_sampler(client):
    forced = generate(client, prompt="Hi", max_new_tokens=4, logit_bias={"65": 100})
    assert forced["token_ids"] == [65] * 4
    plain = generate(client, prompt="Hi", max_new_tokens=4)
    banned = generate(client, prompt="Hi", max_new_tokens=4, logit_bias={str(plain["token_ids"][0]): -100})
    assert banned["token_ids"][0] != plain["token_ids"][0]
    penalties = {"presence_penalty": 2, "frequency_penalty": -1.5, "logit_bias": {"65": 3}}
    native = generate(client, prompt="Hi", max_new_tokens=4, **penalties)
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    completion = client.post("/v1/completions", json={**body, **penalties}).json()
    assert completion["choices"][0]["text"] == native["text"]


def test_a_tiny_temperature_is_greedy_and_null_fields_take_their_defaults(client):
    """Below 1e-5 a temperature would overflow the logits (vLLM samples greedily there too); OpenAI's
    clients send null for the optional fields they leave unset."""
    greedy = generate(client, prompt="Hello", max_new_tokens=6)
    assert generate(client, prompt="Hello", max_new_tokens=6, temperature=1e-39)["token_ids"] == greedy["token_ids"]
    body = {"model": MODEL_NAME, "prompt": "Hello", "ignore_eos": True, "temperature": 0}
    expected = client.post("/v1/completions", json=body).json()["choices"]
    nulls = {"max_tokens": None, "n": None, "presence_penalty": None, "stream": None, "logit_bias": None}
    response = client.post("/v1/completions", json={**body, **nulls})
    assert response.status_code == 200, response.text
    assert response.json()["choices"] == expected
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "n": None, "temperature": None}
    assert "no chat template" in error_of(client.post("/v1/chat/completions", json=chat))["message"], "valid, but"


def test_openai_completions_give_n_choices_per_prompt(client):
    body = {"model": MODEL_NAME, "prompt": ["Hi", "Hello there"], "max_tokens": 6, "ignore_eos": True}
    sampled = {**body, "temperature": 1.0, "seed": 5, "n": 3}
    out = client.post("/v1/completions", json=sampled).json()
    assert [c["index"] for c in out["choices"]] == list(range(6))  # prompt by prompt, then choice
    texts = [c["text"] for c in out["choices"]]
    assert len(set(texts[:3])) > 1, "a seed gives each choice a seed of its own"
    assert client.post("/v1/completions", json=sampled).json()["choices"] == out["choices"], "and reproducibly"
    first = client.post("/v1/completions", json={**sampled, "prompt": "Hi", "n": 1}).json()
    assert first["choices"][0]["text"] == texts[0], "choice 0 samples as the request alone does"
    one_each = client.post("/v1/completions", json={**body, "temperature": 0}).json()
    assert out["usage"]["prompt_tokens"] == one_each["usage"]["prompt_tokens"], "a prompt counts once, not n times"
    assert out["usage"]["completion_tokens"] == 6 * 6
    greedy = client.post("/v1/completions", json={**body, "temperature": 0, "n": 2}).json()
    assert [c["text"] for c in greedy["choices"]] == [one_each["choices"][0]["text"]] * 2 + [
        one_each["choices"][1]["text"]
    ] * 2
    events = stream(client, "/v1/completions", {**sampled, "stream": True, "stream_options": {"include_usage": True}})
    streamed = [""] * 6
    for event in events[:-2]:
        for choice in event["choices"]:
            streamed[choice["index"]] += choice["text"]
    assert streamed == texts and events[-2]["usage"] == out["usage"]


def test_openai_completion_logprobs_shape(client):
    out = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3, "logprobs": 2})
    logprobs = out.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 3
    assert logprobs["text_offset"][0] == 0


def test_models_lists_base_and_adapters(client):
    models = client.get("/v1/models").json()["data"]
    ids = [m["id"] for m in models]
    assert ids[0] == MODEL_NAME and {"lo14", "di"} <= set(ids)
    window = client.post("/tokenize", json={"prompt": "x"}).json()["max_model_len"]
    assert all(m["max_model_len"] == window for m in models)  # vLLM's field: what a client budgets against


def test_chat_without_a_template_is_a_clear_400(client):
    response = client.post(
        "/v1/chat/completions", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 400
    assert "no chat template" in error_of(response)["message"]


BAD_REQUESTS = [
    ("/v1/generate", {"prompt": "hi", "adapter": "nope"}, 404, "adapter 'nope' not found"),
    ("/v1/generate", {"prompt": "hi", "adapter": "lo14@7"}, 404, "no version 7"),
    ("/v1/generate", {"prompt": "hi", "adapter": "../etc"}, 400, "invalid adapter name"),
    ("/v1/generate", {"prompt": "hi", "adapter": "lo14@x"}, 400, "invalid adapter version"),
    ("/v1/generate", {"prompt": "hi", "bogus": 1}, 400, "bogus: unsupported field"),
    ("/v1/generate", {}, 400, "exactly one of prompt or input_ids"),
    ("/v1/generate", {"prompt": "hi", "input_ids": [1]}, 400, "exactly one of prompt or input_ids"),
    ("/v1/generate", {"input_ids": []}, 400, "input_ids must not be empty"),
    ("/v1/generate", {"input_ids": [1, 100000]}, 400, "outside the vocabulary"),
    ("/v1/generate", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/generate", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/generate", {"prompt": "hi", "top_k": -5}, 400, "top_k"),
    ("/v1/generate", {"prompt": "hi", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ("/v1/generate", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/generate", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/generate", {"prompt": "hi", "repetition_penalty": 1e-45}, 400, "repetition_penalty"),
    ("/v1/generate", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/generate", {"prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/generate", {"prompt": "x" * 600}, 400, "context window is 512 tokens"),
    ("/v1/generate", {"prompt": "hi", "max_new_tokens": 600}, 400, "context window is 512 tokens"),
    ("/v1/generate", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model 'nope' not found"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": ["hi", "ho"], "n": 9}, 400, "n: 2 prompt(s) x n=9 make 18"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "n": 2, "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "logit_bias": {"a": 1}}, 400, "logit_bias keys"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "logit_bias": {"-3": 1}}, 400, "logit_bias keys"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "logit_bias": {"5": 1, "05": 1}}, 400, "twice"),
    ("/v1/completions", {"model": "", "prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "stream_options": {}}, 400, "stream=true"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "logit_bias": {"99999": 1}}, 400, "outside the vocab"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/generate", {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/generate", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "frobnicate": True}, 400, "frobnicate: unsupported"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    (
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
        400,
        "tools",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "needs logprobs=true",
    ),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "bogus": None}, 400, "bogus: unsupported"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_REQUESTS, ids=[f"{b}-{s}" for _, b, s, _ in BAD_REQUESTS])
def test_bad_input_gets_a_clear_json_4xx(client, path, body, status, message):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in error_of(response)["message"]


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"prompt": "\xff\xfe"}', "parsing the body"),  # invalid UTF-8 bytes
        (b'{"prompt": "\\ud800"}', "not valid UTF-8"),  # a lone surrogate: valid JSON, not encodable text
        (b'{"prompt": ', "JSON"),
        (b"[1, 2]", ""),
    ],
)
def test_malformed_bodies(client, raw, message):
    response = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert message in error_of(response)["message"]


def test_no_bad_request_reached_the_engine(client):
    """Rejected requests never became engine requests: nothing failed inside the engine."""
    metrics = client.get("/metrics").text
    assert 'status="error"' not in metrics


def test_a_stream_times_out_with_an_error_even_while_its_consumer_is_busy():
    """The deadline may pass while the consumer is away from the stream (writing the last event to a
    slow client): the next wait must raise TimeoutError, which the route turns into an error event and
    [DONE], never cancel the consumer."""
    import asyncio

    from server.api.service import Running, stream_outputs

    class SlowStream:
        cancelled = False

        def __aiter__(self):
            return self

        async def __anext__(self):
            await asyncio.sleep(0.01)
            return "output"

        def cancel(self):
            self.cancelled = True

    async def consume(stream):
        seen = []
        try:
            async for output in stream_outputs(Running(stream, None), timeout=0.05):
                seen.append(output)
                await asyncio.sleep(0.2)  # busy elsewhere when the deadline passes
        except TimeoutError:
            return seen
        raise AssertionError("the stream never timed out")

    stream = SlowStream()
    assert asyncio.run(consume(stream)) == ["output"]
    assert stream.cancelled


def test_a_stream_stuck_sending_to_a_client_that_stopped_reading_is_given_up(monkeypatch):
    """uvicorn's send waits for the socket without a limit: a consumer stuck there past the deadline
    must not keep its request, its engine slot and its outputs for as long as the client holds the
    connection."""
    import asyncio

    import server.api.service as service

    monkeypatch.setattr(service, "EXPIRY_SLACK_SECONDS", 0.05)

    class Stream:
        cancelled = False

        def __aiter__(self):
            return self

        async def __anext__(self):
            return "output"

        def cancel(self):
            self.cancelled = True

    async def stuck(stream):
        outputs = service.stream_outputs(service.Running(stream, None), timeout=0.05)
        assert await anext(outputs) == "output"
        await asyncio.sleep(0.3)  # in a send that does not return
        assert stream.cancelled, "given up while the consumer was away"
        with pytest.raises(TimeoutError):
            await anext(outputs)

    asyncio.run(stuck(Stream()))


def test_request_timeout_aborts_and_frees_the_request(tmp_path):
    import time

    with running_app(FIXTURE / "model", tmp_path, request_timeout=0.3) as client:
        body = {"prompt": "slow", "max_new_tokens": 480, "ignore_eos": True}
        response = client.post("/v1/generate", json=body)
        assert response.status_code == 504 and "did not finish within 0.3 s" in error_of(response)["message"]
        events = stream(client, "/v1/generate", {**body, "stream": True})
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 504
        # The stream ends at once; the engine thread frees the KV blocks at its next step.
        deadline = time.monotonic() + 5
        ready = client.get("/ready").json()
        while (ready["requests_in_flight"] or ready["kv_cache_usage"]) and time.monotonic() < deadline:
            time.sleep(0.05)
            ready = client.get("/ready").json()
        assert ready["requests_in_flight"] == 0 and ready["kv_cache_usage"] == 0.0
