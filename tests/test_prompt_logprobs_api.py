"""Prompt logprobs over HTTP: the native route's `prompt_logprobs` and the OpenAI completions' `echo` (with
`logprobs`, as lm-evaluation-harness scores a continuation: token-id prompts, `max_tokens` 1, the sum of
`token_logprobs` over the continuation), each equal to the slow reference with the adapter applied, and
streaming equal to the whole answer."""

import random
import threading

import pytest
import torch

from server.adapters.materialize import materialize
from server.adapters.pyreft import import_pyreft
from server.reft.reference import reference_prompt_logprobs
from tests.api_utils import running_app, stream, upload, wait_for
from tests.conftest import FIXTURE, load_reference_model

MODEL_NAME = "model"
VOCAB = 259


@pytest.fixture(scope="module", params=["thread", "process"])
def served(request, tmp_path_factory):
    """(client, adapter as the reference applies it, reference model), the engine in a thread or a process of
    its own (the scores then cross a pipe)."""
    adapter_file = import_pyreft(FIXTURE / "adapters" / "di_l13_f1l2_unshared", positions="f1+l2", share_weights=False)
    store = tmp_path_factory.mktemp("store")
    with running_app(
        FIXTURE / "model", store, max_batched_tokens=32, engine_core=request.param, device="cpu"
    ) as client:
        assert upload(client, "di", adapter_file.to_bytes()).status_code == 201
        yield client, materialize(adapter_file, name="di", version=1), load_reference_model(FIXTURE / "model")


def token_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, VOCAB) for _ in range(length - 1)]


def scores(reference_model, prompt_ids, adapter=None) -> list[float]:
    log_probs = reference_prompt_logprobs(reference_model, prompt_ids, adapter)
    return log_probs.gather(1, torch.tensor(prompt_ids[1:])[:, None])[:, 0].tolist()


@pytest.mark.parametrize("adapter", ["di", None])
def test_native_prompt_logprobs_equal_the_reference(served, adapter):
    client, di, reference_model = served
    prompt_ids = token_prompt(45, 1)  # longer than a step's 32 tokens: scored over two steps
    body = {"input_ids": prompt_ids, "max_new_tokens": 3, "ignore_eos": True, "adapter": adapter}
    plain = client.post("/v1/generate", json=body).json()
    out = client.post("/v1/generate", json={**body, "prompt_logprobs": 2}).json()
    assert out["token_ids"] == plain["token_ids"] and "prompt_logprobs" not in plain
    entries = out["prompt_logprobs"]
    assert entries[0] is None and [e["token_id"] for e in entries[1:]] == prompt_ids[1:]
    expected = scores(reference_model, prompt_ids, di if adapter else None)
    assert [e["logprob"] for e in entries[1:]] == pytest.approx(expected, abs=1e-4)
    assert all(len(e["top_logprobs"]) == 2 for e in entries[1:])
    # the rank of a token among its top alternatives is its place there
    for e in entries[1:]:
        listed = [alternative["token_id"] for alternative in e["top_logprobs"]]
        assert e["rank"] == listed.index(e["token_id"]) + 1 if e["token_id"] in listed else e["rank"] > 2
    events = stream(client, "/v1/generate", {**body, "prompt_logprobs": 2, "stream": True})[:-1]
    assert events[0]["prompt_logprobs"] == entries and all("prompt_logprobs" not in e for e in events[1:])


def test_echo_with_logprobs_scores_a_continuation_as_lm_eval_reads_it(served):
    client, di, reference_model = served
    context, continuation = token_prompt(20, 2), token_prompt(8, 3)[1:]
    prompt_ids = context + continuation
    body = {"model": "di", "prompt": prompt_ids, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt_ids) + 1  # the prompt's tokens, then the one generated
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    served_sum = sum(logprobs["token_logprobs"][len(context) : -1])
    assert served_sum == pytest.approx(sum(scores(reference_model, prompt_ids, di)[len(context) - 1 :]), abs=1e-3)
    assert all(len(top) == 1 for top in logprobs["top_logprobs"][1:])
    generated = client.post("/v1/completions", json={**body, "echo": False}).json()["choices"][0]
    assert choice["text"].endswith(generated["text"])
    assert logprobs["token_logprobs"][-1] == pytest.approx(generated["logprobs"]["token_logprobs"][0], abs=1e-5)
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_echo_without_logprobs_prefixes_each_choice_with_its_prompt(served):
    client, _, _ = served
    body = {"model": MODEL_NAME, "prompt": ["Hello there", "Good"], "max_tokens": 4, "n": 2, "echo": True}
    out = client.post("/v1/completions", json={**body, "temperature": 0}).json()
    plain = client.post("/v1/completions", json={**body, "temperature": 0, "echo": False}).json()
    for choice, generated in zip(out["choices"], plain["choices"], strict=True):
        prompt = body["prompt"][choice["index"] // 2]
        assert choice["text"] == prompt + generated["text"] and choice["logprobs"] is None


def test_echo_streams_as_it_answers_whole(served):
    client, _, _ = served
    body = {"model": "di", "prompt": token_prompt(40, 4), "max_tokens": 5, "logprobs": 2, "echo": True}
    whole = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]
    events = stream(client, "/v1/completions", {**body, "temperature": 0, "stream": True})[:-1]
    parts = [event["choices"][0] for event in events]
    assert "".join(p["text"] for p in parts) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert [x for p in parts for x in p["logprobs"][key]] == whole["logprobs"][key]


def test_echo_streams_the_text_offsets_it_answers_whole(served):
    """A text prompt's echoed text lacks the BOS its tokens begin with: the offsets of the tokens streamed after
    the first event go on from the tokens before them, as in the whole answer, never back into the prompt."""
    client, _, _ = served
    body = {"model": MODEL_NAME, "prompt": "Hello world", "max_tokens": 6, "logprobs": 1, "echo": True}
    body |= {"temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["text_offset"]
    events = stream(client, "/v1/completions", {**body, "stream": True})[:-1]
    streamed = [offset for event in events for offset in event["choices"][0]["logprobs"]["text_offset"]]
    assert len(events) > 1 and streamed == whole


def assert_vllm_prompt_logprobs(entries, prompt_ids, expected, top):
    """vLLM's shape: null first, then {token id: {logprob, rank, decoded_token}} with the prompt token first."""
    assert entries[0] is None and len(entries) == len(prompt_ids)
    for entry, token, logprob in zip(entries[1:], prompt_ids[1:], expected, strict=True):
        own = entry[str(token)]
        assert next(iter(entry)) == str(token) and own["logprob"] == pytest.approx(logprob, abs=1e-4)
        assert isinstance(own["decoded_token"], str)
        ranks = sorted(e["rank"] for e in entry.values())
        if len(entry) == top:  # the prompt token is among the `top` most likely, listed once
            assert ranks == list(range(1, top + 1))
        else:
            assert len(entry) == top + 1 and own["rank"] > top and ranks[:-1] == list(range(1, top + 1))


@pytest.mark.parametrize("adapter", ["di", None])
def test_completions_prompt_logprobs_in_vllms_shape_equal_the_reference(served, adapter):
    client, di, reference_model = served
    prompt_ids = token_prompt(40, 7)
    model = adapter or MODEL_NAME
    body = {"model": model, "prompt": prompt_ids, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3}
    out = client.post("/v1/completions", json=body).json()
    expected = scores(reference_model, prompt_ids, di if adapter else None)
    assert_vllm_prompt_logprobs(out["choices"][0]["prompt_logprobs"], prompt_ids, expected, 3)
    plain = client.post("/v1/completions", json={**body, "prompt_logprobs": None}).json()["choices"][0]
    assert out["choices"][0]["text"] == plain["text"] and "prompt_logprobs" not in plain


def test_prompt_logprobs_beside_echo_each_keep_their_own_number_of_alternatives(served):
    client, di, reference_model = served
    prompt_ids = token_prompt(15, 8)
    body = {"model": "di", "prompt": prompt_ids, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    choice = client.post("/v1/completions", json={**body, "prompt_logprobs": 4}).json()["choices"][0]
    assert all(len(top) == 1 for top in choice["logprobs"]["top_logprobs"][1:])
    expected = scores(reference_model, prompt_ids, di)
    assert choice["logprobs"]["token_logprobs"][1 : len(prompt_ids)] == pytest.approx(expected, abs=1e-4)
    assert_vllm_prompt_logprobs(choice["prompt_logprobs"], prompt_ids, expected, 4)


def test_chat_prompt_logprobs_score_the_rendered_chat_beside_the_choices(served, monkeypatch):
    client, di, reference_model = served
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    monkeypatch.setattr(client.app.state.reft.tokenizer, "chat_template", template)  # the fixture's has none
    messages = [{"role": "user", "content": "score me"}]
    body = {"model": "di", "messages": messages, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 0}
    out = client.post("/v1/chat/completions", json=body).json()
    prompt_ids = client.post("/tokenize", json={"model": "di", "messages": messages}).json()["tokens"]
    assert out["usage"]["prompt_tokens"] == len(prompt_ids)
    entries = out["prompt_logprobs"]
    assert_vllm_prompt_logprobs(entries, prompt_ids, scores(reference_model, prompt_ids, di), 0)
    assert all(len(entry) == 1 for entry in entries[1:])  # no alternatives asked: the token alone


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_are_not_streamed_as_in_vllm(served, route):
    client, _, _ = served
    prompt = {"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    response = client.post(route, json={"model": MODEL_NAME, **prompt, "stream": True, "prompt_logprobs": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt_logprobs"


def test_prompt_logprobs_out_of_range_is_a_400(served):
    client, _, _ = served
    response = client.post("/v1/generate", json={"prompt": "hi", "prompt_logprobs": 21})
    assert response.status_code == 400 and "prompt_logprobs" in response.text


def test_echo_with_no_tokens_to_generate_answers_the_prompt_alone(served):
    """max_tokens 0 with echo, as older scoring clients send it: the prompt's text and scores alone (the one
    token the engine draws is dropped), no completion tokens counted; without echo it is a 400."""
    client, di, reference_model = served
    prompt_ids = token_prompt(12, 5)
    body = {"model": "di", "prompt": prompt_ids, "max_tokens": 0, "logprobs": 2, "echo": True, "temperature": 0}
    out = client.post("/v1/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == len(prompt_ids)
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(scores(reference_model, prompt_ids, di), abs=1e-4)
    events = stream(client, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == choice["text"]
    assert events[-2]["usage"]["completion_tokens"] == 0
    refused = client.post("/v1/completions", json={**body, "echo": False})
    assert refused.status_code == 400 and "max_tokens" in refused.text


def test_echo_with_no_tokens_to_generate_that_is_given_up_says_so(tiny_model_dir, tmp_path):
    """A max_tokens 0 echo that the server gives up on before it is scored (the end of a shutdown's grace)
    ends with "abort", as any completion does: not with "length", which says the prompt was scored."""
    with running_app(tiny_model_dir("llama"), tmp_path) as client:
        engine = client.app.state.reft.engine
        core, release = engine.host.core, threading.Event()
        real_step = core.step
        core.step = lambda: release.wait(30) and real_step()  # stuck: nothing is scored meanwhile
        model = client.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "hello", "max_tokens": 0, "echo": True, "logprobs": 1}
        answers = []
        asking = threading.Thread(target=lambda: answers.append(client.post("/v1/completions", json=body)))
        asking.start()
        try:
            wait_for(lambda: engine.num_in_flight == 1)
            client.portal.call(engine.cancel_all)
            asking.join(10)
        finally:
            release.set()
    choice = answers[0].json()["choices"][0]
    assert choice["finish_reason"] == "abort" and choice["logprobs"]["token_logprobs"] == []
