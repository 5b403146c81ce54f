"""vLLM's /tokenize and /detokenize: the ids a prompt or a chat is served as, exactly; text back from ids;
bad input a clear 400."""

import pytest

from server.smollm2 import convert_smollm2
from server.tokenization import encode_chat, encode_prompt
from tests.api_utils import running_app

CHAT = [{"role": "user", "content": "Where is the treasure?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server of the demo's SmolLM2 (a real tokenizer with a chat template), and that tokenizer."""
    from transformers import AutoTokenizer

    model_dir = tmp_path_factory.mktemp("smollm2") / "model"
    convert_smollm2(model_dir)
    with running_app(model_dir, tmp_path_factory.mktemp("store")) as client:
        yield client, AutoTokenizer.from_pretrained(model_dir)


def test_a_prompt_and_a_chat_tokenize_as_they_are_served(served):
    client, tokenizer = served
    prompt = client.post("/tokenize", json={"prompt": "Hello there"}).json()
    assert prompt["tokens"] == encode_prompt(tokenizer, "Hello there") and prompt["count"] == len(prompt["tokens"])
    chat = client.post("/tokenize", json={"model": "anything", "messages": CHAT}).json()
    assert chat["tokens"] == encode_chat(tokenizer, CHAT) and chat["max_model_len"] > chat["count"]
    model = client.get("/v1/models").json()["data"][0]["id"]
    completion = client.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 1})
    assert completion.json()["usage"]["prompt_tokens"] == chat["count"]


def test_detokenize_gives_the_text_back(served):
    client, tokenizer = served
    ids = client.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == tokenizer.decode(ids)


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/tokenize", {}, "exactly one of prompt or messages"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, "exactly one of prompt or messages"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": False}, "add_special_tokens"),
        ("/detokenize", {"tokens": [10**9]}, "outside the vocabulary"),
    ],
)
def test_bad_input_is_a_clear_400(served, path, body, message):
    client, _ = served
    response = client.post(path, json=body)
    assert response.status_code == 400 and message in response.text
