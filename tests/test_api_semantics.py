"""HTTP API semantics that vLLM / OpenAI clients rely on: finish reasons at the edges, streams whose
client left before they began, what a stop leaves in the text and the tokens, empty prompts."""

import asyncio
import json

import pytest

from server.engine.async_engine import GenerationRequest, RequestStream
from server.engine.core import SeqOutput
from server.engine.sampler import Sample
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import FinishReason
from server.models.tiny import byte_level_tokenizer
from tests.api_utils import error_of, running_app, wait_for

MODEL = "tiny_llama0"  # the served name: the tiny model's directory name


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    with running_app(tiny_model_dir("llama"), tmp_path_factory.mktemp("store")) as client:
        yield client


def complete(client, **body) -> dict:
    response = client.post("/v1/completions", json={"model": MODEL, "temperature": 0, "ignore_eos": True, **body})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def plain(text: str) -> bool:
    return text.isascii() and text.isprintable()


def greedy_tokens(client) -> list[int]:
    body = {"prompt": "hello", "max_new_tokens": 32, "ignore_eos": True}
    return client.post("/v1/generate", json=body).json()["token_ids"]


def test_a_stop_string_ended_by_the_last_allowed_token_finishes_with_stop(client):
    decode = client.app.state.reft.tokenizer.decode
    tokens = greedy_tokens(client)
    last = max(i for i in range(1, len(tokens)) if plain(decode(tokens[i - 1 : i + 1])))
    stop = decode(tokens[last - 1 : last + 1])  # ended by token `last`, the last one allowed below
    choice = complete(client, prompt="hello", max_tokens=last + 1, stop=stop)
    assert choice["text"] == decode(tokens[: last - 1])
    assert choice["finish_reason"] == "stop"


def asgi_post(path: str, body: dict) -> tuple[dict, list]:
    """A POST's scope and its receive queue: the body, then at once the client's disconnect."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    return scope, [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 400, "stream": True}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}),
        ("/v1/generate", {"prompt": "hello", "max_new_tokens": 400, "ignore_eos": True, "stream": True}),
    ],
)
def test_a_stream_whose_client_left_before_it_began_is_aborted(client, path, body):
    engine = client.app.state.reft.engine
    scope, messages = asgi_post(path, body)

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        await asyncio.sleep(0)

    client.portal.call(client.app, scope, receive, send)
    wait_for(lambda: engine.num_in_flight == 0, timeout=5)


def test_tokens_past_a_stop_string_are_not_reported_when_outputs_pile_up():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer("abcdef", add_special_tokens=False)["input_ids"]
    request = GenerationRequest([1], SamplingParams(max_new_tokens=16, stop=("bc",)))
    stream = RequestStream(request, tokenizer, abort=lambda _: None, on_finished=lambda *_: None)
    for i, token in enumerate(ids):  # steps the consumer had no time to read: they come coalesced
        stream.put(SeqOutput(request.request_id, [token], [Sample(token)], num_prompt=1, num_generated=i + 1))

    output = asyncio.run(stream.collect())
    assert (output.text, output.finish_reason) == ("a", FinishReason.STOP)
    assert output.token_ids == ids[:3] and len(output.logprobs) == 3
    assert output.completion_tokens == 3


def test_a_chat_the_template_renders_to_no_tokens_is_a_400(client, monkeypatch):
    tokenizer = client.app.state.reft.tokenizer
    monkeypatch.setattr(tokenizer, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    body = {"model": MODEL, "messages": [{"role": "user", "content": ""}], "max_tokens": 3}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == "messages"


def test_an_empty_text_prompt_is_served_alike_alone_or_in_a_list(client):
    """As /v1/generate and vLLM do: the empty text is the BOS token alone, not an empty prompt."""
    alone = complete(client, prompt="", max_tokens=4)
    assert alone == complete(client, prompt=[""], max_tokens=4)
    refused = client.post("/v1/completions", json={"model": MODEL, "prompt": []})
    assert refused.status_code == 400 and error_of(refused)["param"] == "prompt"


def test_the_stop_token_is_in_the_tokens_not_the_text(client):
    """vLLM's meaning of stop_token_ids: like EOS, the token that stops is not rendered."""
    decode = client.app.state.reft.tokenizer.decode
    tokens = greedy_tokens(client)
    stop = next(i for i, t in enumerate(tokens) if plain(decode([t])) and t not in tokens[:i])
    body = {"prompt": "hello", "max_new_tokens": 32, "ignore_eos": True, "stop_token_ids": [tokens[stop]]}
    stopped = client.post("/v1/generate", json=body).json()
    assert stopped["token_ids"] == tokens[: stop + 1] and stopped["finish_reason"] == "stop"
    assert stopped["text"] == decode(tokens[:stop])
