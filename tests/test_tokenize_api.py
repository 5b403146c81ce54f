"""vLLM's /tokenize and /detokenize: the ids a prompt or a chat is served as, exactly; text back from ids;
vLLM's optional fields with vLLM's meaning; `model` resolved as the generation routes resolve it; bad input
a clear 400 or 404."""

import pytest

from server.adapters.random_adapters import random_adapter_file
from server.tokenization import encode_chat, encode_prompt
from tests.api_utils import error_of, running_app, upload
from tests.conftest import SMOLLM2_DEMO_TIMEOUT

CHAT = [{"role": "user", "content": "Where is the treasure?"}]
PREFILLED = [*CHAT, {"role": "assistant", "content": "Arr, the treasure be"}]  # an answer begun, to go on with
ADAPTER = "pirate"
NEVER_SERVED = "parrot"  # named by /tokenize alone

pytestmark = pytest.mark.timeout(SMOLLM2_DEMO_TIMEOUT)  # the first test here may build the session's demo


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_demo):
    """A server of the demo's SmolLM2 (a real tokenizer with a chat template) with an adapter, that
    tokenizer, and the base model's served name."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = smollm2_demo[0].model_dir  # converted once per session; this server has a store of its own
    hidden_size = AutoConfig.from_pretrained(model_dir).hidden_size
    adapter = random_adapter_file("loreft", (1,), 2, "f1+l1", hidden_size)
    with running_app(model_dir, tmp_path_factory.mktemp("store")) as client:
        for name in (ADAPTER, NEVER_SERVED):
            assert upload(client, name, adapter.to_bytes()).status_code == 201
        model = client.get("/v1/models").json()["data"][0]["id"]
        yield client, AutoTokenizer.from_pretrained(model_dir), model


def tokenized(client, **body) -> dict:
    response = client.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def greedy(client, path: str, max_tokens: int = 4, **body) -> dict:
    response = client.post(path, json={"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_prompt_and_a_chat_tokenize_as_they_are_served(served):
    client, tokenizer, model = served
    prompt = tokenized(client, prompt="Hello there")
    assert prompt["tokens"] == encode_prompt(tokenizer, "Hello there") and prompt["count"] == len(prompt["tokens"])
    completion = greedy(client, "/v1/completions", 1, model=model, prompt="Hello there")
    assert completion["usage"]["prompt_tokens"] == prompt["count"]
    chat = tokenized(client, model=model, messages=CHAT)
    assert chat["tokens"] == encode_chat(tokenizer, CHAT) and chat["max_model_len"] > chat["count"]
    completion = greedy(client, "/v1/chat/completions", 1, model=model, messages=CHAT)
    assert completion["usage"]["prompt_tokens"] == chat["count"]


def test_vllms_fields_at_their_defaults_change_nothing(served):
    client, _, model = served
    prompt_defaults = {"add_special_tokens": True, "return_token_strs": False}
    assert tokenized(client, prompt="Hi", **prompt_defaults) == tokenized(client, prompt="Hi")
    chat_defaults = {
        "add_generation_prompt": True,
        "continue_final_message": False,
        "add_special_tokens": False,
        "return_token_strs": None,
        "chat_template": None,
        "chat_template_kwargs": {},
        "mm_processor_kwargs": None,
        "tools": [],
    }
    assert tokenized(client, model=model, messages=CHAT, **chat_defaults) == tokenized(client, messages=CHAT)


def test_chat_template_kwargs_are_variables_of_the_template_on_both_routes(served):
    """vLLM's chat_template_kwargs (e.g. a Qwen3 template's enable_thinking): here a template that reads a
    `persona` variable, set on the served tokenizer for this test."""
    client, tokenizer, model = served
    template = (
        "{% if persona %}<|im_start|>system\n{{ persona }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    served_tokenizer = client.app.state.reft.tokenizer
    usual, served_tokenizer.chat_template, tokenizer.chat_template = served_tokenizer.chat_template, template, template
    try:
        kwargs = {"persona": "You are a pirate."}
        expected = encode_chat(tokenizer, CHAT, template_kwargs=kwargs)
        assert tokenizer.decode(expected).startswith("<|im_start|>system\nYou are a pirate.")
        assert tokenized(client, messages=CHAT, chat_template_kwargs=kwargs)["tokens"] == expected
        assert tokenized(client, messages=CHAT)["tokens"] == encode_chat(tokenizer, CHAT) != expected
        completion = greedy(client, "/v1/chat/completions", 1, model=model, messages=CHAT, chat_template_kwargs=kwargs)
        assert completion["usage"]["prompt_tokens"] == len(expected)
    finally:
        served_tokenizer.chat_template = tokenizer.chat_template = usual


def test_add_special_tokens_false_gives_the_texts_tokens_alone(served):
    client, tokenizer, _ = served
    served_ids = tokenized(client, prompt="Hello there")["tokens"]
    alone = tokenized(client, prompt="Hello there", add_special_tokens=False)
    assert served_ids == [tokenizer.bos_token_id, *alone["tokens"]] and alone["count"] == len(served_ids) - 1


def test_a_chat_with_add_special_tokens_gets_no_second_bos(served):
    """SmolLM2's template begins with its BOS: the special tokens a raw prompt gets are there already."""
    client, tokenizer, _ = served
    chat = tokenized(client, messages=CHAT)["tokens"]
    assert chat[0] == tokenizer.bos_token_id
    assert tokenized(client, messages=CHAT, add_special_tokens=True)["tokens"] == chat


def test_return_token_strs_gives_each_tokens_string(served):
    client, tokenizer, _ = served
    assert "token_strs" not in tokenized(client, prompt="Hello there")
    for body in ({"prompt": "Hello there"}, {"messages": CHAT}):
        response = tokenized(client, **body, return_token_strs=True)
        assert response["token_strs"] == tokenizer.convert_ids_to_tokens(response["tokens"])
        assert len(response["token_strs"]) == response["count"]


def test_a_chat_without_the_generation_prompt_ends_after_its_last_message(served):
    client, _, model = served
    with_header = tokenized(client, messages=CHAT)["tokens"]
    without = tokenized(client, messages=CHAT, add_generation_prompt=False)["tokens"]
    assert with_header[: len(without)] == without and len(with_header) > len(without)
    completion = greedy(client, "/v1/chat/completions", 1, model=model, messages=CHAT, add_generation_prompt=False)
    assert completion["usage"]["prompt_tokens"] == len(without)


def test_continue_final_message_leaves_the_answer_open_on_both_routes(served):
    """The chat route goes on from exactly the ids /tokenize gives: its greedy continuation is that of a
    completion of those ids."""
    client, tokenizer, model = served
    options = {"add_generation_prompt": False, "continue_final_message": True}
    open_answer = tokenized(client, messages=PREFILLED, **options)["tokens"]
    closed = tokenized(client, messages=PREFILLED, add_generation_prompt=False)["tokens"]
    assert closed[: len(open_answer)] == open_answer and len(closed) > len(open_answer)
    assert tokenizer.decode(open_answer).endswith(PREFILLED[-1]["content"])
    chat = greedy(client, "/v1/chat/completions", model=model, messages=PREFILLED, **options)
    completion = greedy(client, "/v1/completions", model=model, prompt=open_answer)
    assert chat["usage"]["prompt_tokens"] == len(open_answer)
    assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"]


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_model_is_any_served_model_else_the_generation_routes_404(served, path):
    client, _, model = served
    body = {"prompt": "Hi"} if path == "/tokenize" else {"tokens": [1, 2, 3]}
    expected = client.post(path, json=body).json()
    for served_model in (model, ADAPTER, f"{ADAPTER}@1"):  # every adapter tokenizes as the base model
        assert client.post(path, json={**body, "model": served_model}).json() == expected
    for unknown in ("nope", f"{ADAPTER}@9"):
        response = client.post(path, json={**body, "model": unknown})
        generation = client.post("/v1/completions", json={"model": unknown, "prompt": "Hi", "max_tokens": 1})
        assert response.status_code == generation.status_code == 404
        assert error_of(response) == error_of(generation)


def test_naming_an_adapter_loads_nothing(served):
    """Tokenizing must not load an adapter, which could evict one that requests are using."""
    client, _, _ = served
    registry = client.app.state.reft.registry
    for ref in (NEVER_SERVED, f"{NEVER_SERVED}@1"):
        assert client.post("/tokenize", json={"model": ref, "prompt": "Hi"}).status_code == 200
        assert client.post("/detokenize", json={"model": ref, "tokens": [1]}).status_code == 200
    assert not registry.is_resident(NEVER_SERVED, 1)


def test_detokenize_gives_the_text_back(served):
    client, tokenizer, _ = served
    ids = tokenized(client, messages=CHAT)["tokens"]
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == tokenizer.decode(ids)


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/tokenize", {}, "exactly one of prompt or messages"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, "exactly one of prompt or messages"),
        ("/tokenize", {"prompt": "a", "add_generation_prompt": False}, "add_generation_prompt: only with messages"),
        ("/tokenize", {"prompt": "a", "tools": None}, "tools: only with messages"),
        ("/tokenize", {"messages": CHAT, "continue_final_message": True}, "needs add_generation_prompt=false"),
        ("/tokenize", {"messages": CHAT, "chat_template": "{{ messages }}"}, "chat_template: not supported"),
        ("/tokenize", {"messages": CHAT, "chat_template_kwargs": {"tokenize": True}}, "tokenize: set by the server"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "chat_template_kwargs": {"messages": [], "return_dict": True}},
            "messages, return_dict: set by the server",
        ),
        ("/tokenize", {"messages": CHAT, "mm_processor_kwargs": {"fps": 1}}, "mm_processor_kwargs: not supported"),
        ("/tokenize", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools.0.function: Field required"),
        ("/tokenize", {"model": "", "prompt": "a"}, "model"),
        ("/tokenize", {"model": "../etc", "prompt": "a"}, "invalid adapter name"),
        ("/detokenize", {"tokens": [10**9]}, "outside the vocabulary"),
        ("/v1/chat/completions", {"messages": CHAT, "continue_final_message": True}, "needs add_generation_prompt"),
    ],
)
def test_bad_input_is_a_clear_400(served, path, body, message):
    client, _, model = served
    response = client.post(path, json={"model": model, **body} if path.startswith("/v1") else body)
    assert response.status_code == 400 and message in error_of(response)["message"]
