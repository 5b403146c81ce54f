"""OpenAI function calling on the chat route as vLLM serves it without a tool-call parser: a named function's call and
"required"'s calls held to their schemas by structured outputs, read back as tool_calls (whole or streamed, alike);
"none" plain text; "auto" without a parser a clear 400 (with one: test_tool_call_parser.py); tools and earlier calls
rendered by the chat template, on /tokenize alike.

The tiny random model pads flexible JSON with whitespace until its tokens run out: its requests here bias the
whitespace bytes away, so that greedy calls complete."""

import json

import pytest
from transformers import AutoTokenizer

from server.adapters.random_adapters import random_adapter_file
from server.tokenization import encode_chat
from tests.api_utils import running_app, stream, upload

# a template that renders tools, calls (their arguments as JSON) and the call a tool message answers
TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|tools|>{% for t in tools %}{{ t | tojson }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call {{ c.id }}>{{ c.function.name }}{{ c.function.arguments | tojson }}"
    "{% endfor %}{% if m.tool_call_id %}<for {{ m.tool_call_id }}>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TIME |= {"additionalProperties": False}
SCHEMAS = {"weather": WEATHER, "time": TIME}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": schema}} for name, schema in SCHEMAS.items()]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
ADAPTER = "forecaster"


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.fixture(scope="module", params=["thread", "process"])
def served(request, tiny_model_dir, tmp_path_factory):
    """A server of the tiny Llama (its engine in a thread or a process) whose template renders tools, with an
    adapter; the body every request here starts from; a tokenizer like the served one."""
    directory = tiny_model_dir("llama")
    store = tmp_path_factory.mktemp("store")
    with running_app(directory, store, engine_core=request.param, device="cpu", max_model_len=1024) as client:
        client.app.state.reft.tokenizer.chat_template = TEMPLATE
        adapter = random_adapter_file("loreft", (1,), 2, "f1+l1", 128)
        assert upload(client, ADAPTER, adapter.to_bytes()).status_code == 201
        tokenizer = AutoTokenizer.from_pretrained(directory)
        tokenizer.chat_template = TEMPLATE
        whitespace = tokenizer(" \n\t\r", add_special_tokens=False)["input_ids"]
        body = {
            "model": client.get("/v1/models").json()["data"][0]["id"],
            "messages": ASK,
            "tools": TOOLS,
            "max_tokens": 96,
            "temperature": 0,
            "logit_bias": {str(token): -100 for token in whitespace},
        }
        yield client, body, tokenizer


def chat(client, body: dict) -> dict:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def valid(call: dict) -> bool:
    """A call of one of the tools whose arguments are an instance of its schema (enums, all required, no more)."""
    schema = SCHEMAS[call["function"]["name"]]
    arguments = json.loads(call["function"]["arguments"])
    properties = schema["properties"]
    return arguments.keys() == properties.keys() and all(v in properties[k]["enum"] for k, v in arguments.items())


def streamed(events: list) -> dict[int, dict]:
    """Each choice's message and finish reason, put together from its deltas as a client does."""
    choices: dict[int, dict] = {}
    for event in events[:-1]:
        for part in event["choices"]:
            choice = choices.setdefault(part["index"], {"content": "", "calls": {}, "finish_reason": None})
            delta = part["delta"]
            choice["content"] += delta.get("content") or ""
            for call in delta.get("tool_calls", []):
                whole = choice["calls"].setdefault(call["index"], {"function": {"arguments": ""}})
                whole |= {key: call[key] for key in ("id", "type") if key in call}
                whole["function"]["name"] = call["function"].get("name", whole["function"].get("name"))
                whole["function"]["arguments"] += call["function"]["arguments"]
            choice["finish_reason"] = part["finish_reason"] or choice["finish_reason"]
    return choices


def test_a_named_function_is_called_with_arguments_of_its_schema(served):
    client, body, _ = served
    choice = chat(client, {**body, "tool_choice": named("weather")})["choices"][0]
    message = choice["message"]
    assert message["content"] == "" and len(message["tool_calls"]) == 1, choice
    call = message["tool_calls"][0]
    assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function" and valid(call), call
    assert call["function"]["name"] == "weather" and choice["finish_reason"] == "stop"  # vLLM's for a named call


def test_required_calls_name_the_given_tools(served):
    client, body, _ = served
    choice = chat(client, {**body, "tool_choice": "required", "max_tokens": 160})["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert calls and all(valid(call) for call in calls), choice
    assert choice["finish_reason"] in ("tool_calls", "length")  # greedy random weights may call on and on
    assert len({call["id"] for call in calls}) == len(calls)


def test_parallel_tool_calls_false_makes_one_call(served):
    client, body, _ = served
    for tool_choice in ("required", named("time")):
        choice = chat(client, {**body, "tool_choice": tool_choice, "parallel_tool_calls": False})["choices"][0]
        calls = choice["message"]["tool_calls"]
        assert len(calls) == 1 and valid(calls[0]), choice
        assert choice["finish_reason"] == ("tool_calls" if tool_choice == "required" else "stop")


def test_required_holds_tools_whose_schemas_reference_their_definitions(served):
    """Each tool's $defs move to the root of "required"'s one schema, where its "#/$defs/..." references point (two
    tools may define a name alike)."""
    client, body, _ = served
    place = {"$defs": {"place": {"enum": ["Oslo", "Lima"]}}, "type": "object", "additionalProperties": False}
    place |= {"properties": {"place": {"$ref": "#/$defs/place"}}, "required": ["place"]}
    tools = [{"type": "function", "function": {"name": name, "parameters": place}} for name in ("visit", "leave")]
    fields = {"tools": tools, "tool_choice": "required", "parallel_tool_calls": False}
    choice = chat(client, {**body, **fields})["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] in ("visit", "leave") and choice["finish_reason"] == "tool_calls", choice
    assert json.loads(call["function"]["arguments"]) in ({"place": "Oslo"}, {"place": "Lima"})


def test_none_answers_in_text_with_the_tools_in_the_prompt(served):
    """As vLLM's default: the template shows the tools; the model may not call them."""
    client, body, _ = served
    choice = chat(client, {**body, "tool_choice": "none", "max_tokens": 8})
    assert "tool_calls" not in choice["choices"][0]["message"] and choice["choices"][0]["message"]["content"]
    with_tools = client.post("/tokenize", json={"messages": ASK, "tools": TOOLS}).json()["count"]
    assert (
        choice["usage"]["prompt_tokens"]
        == with_tools
        > client.post("/tokenize", json={"messages": ASK}).json()["count"]
    )


@pytest.mark.parametrize("tool_choice", [None, "auto"])
def test_auto_is_a_clear_400_that_says_what_to_give(served, tool_choice):
    client, body, _ = served
    response = client.post("/v1/chat/completions", json={**body, "tool_choice": tool_choice})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "tool_choice", response.text
    assert '"auto"' in error["message"] and '"required"' in error["message"] and "parser" in error["message"]


@pytest.mark.parametrize("tool_choice", [named("weather"), "required"], ids=["named", "required"])
def test_streamed_calls_are_the_whole_answers_calls(served, tool_choice):
    client, body, _ = served
    whole = chat(client, {**body, "tool_choice": tool_choice, "n": 2})["choices"]
    events = stream(client, "/v1/chat/completions", {**body, "tool_choice": tool_choice, "n": 2, "stream": True})
    assert events[-1] == "[DONE]"
    for index, choice in streamed(events).items():
        expected = whole[index]
        calls = [choice["calls"][i] for i in sorted(choice["calls"])]
        assert choice["content"] == expected["message"]["content"] == ""
        assert [c["function"] for c in calls] == [c["function"] for c in expected["message"]["tool_calls"]]
        assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function" for c in calls)
        assert choice["finish_reason"] == expected["finish_reason"]


def test_a_named_calls_arguments_stream_as_generated(served):
    """vLLM's shape: the first delta of the call carries its id, type and name; the next ones its arguments alone."""
    client, body, _ = served
    events = stream(client, "/v1/chat/completions", {**body, "tool_choice": named("time"), "stream": True})
    deltas = [part["delta"] for event in events[:-1] for part in event["choices"] if part["delta"].get("tool_calls")]
    first, *rest = [delta["tool_calls"][0] for delta in deltas]
    assert first["function"]["name"] == "time" and first["id"].startswith("chatcmpl-tool-") and len(rest) > 3
    assert all(call.keys() == {"index", "function"} and call["function"].keys() == {"arguments"} for call in rest)


HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call-1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Paris", "unit": "C"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call-1", "content": "21"},
]
# as chat templates take them (transformers' tool use, vLLM's): arguments an object, no content the empty text
RENDERED = [
    *ASK,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call-1",
                "type": "function",
                "function": {"name": "weather", "arguments": {"city": "Paris", "unit": "C"}},
            }
        ],
    },
    {"role": "tool", "content": "21", "tool_call_id": "call-1"},
]


def test_earlier_calls_and_their_results_render_through_the_template(served):
    client, body, tokenizer = served
    expected = encode_chat(tokenizer, RENDERED, tools=TOOLS)
    assert '<call call-1>weather{"city": "Paris", "unit": "C"}' in tokenizer.decode(expected)
    assert client.post("/tokenize", json={"messages": HISTORY, "tools": TOOLS}).json()["tokens"] == expected
    answer = chat(client, {**body, "messages": HISTORY, "tool_choice": "none", "max_tokens": 4})
    assert answer["usage"]["prompt_tokens"] == len(expected)


def test_an_adapter_n_choices_and_logprobs_keep_working_with_tools(served):
    client, body, _ = served
    sampled = {**body, "model": ADAPTER, "tool_choice": "required", "parallel_tool_calls": False, "n": 3}
    out = chat(client, sampled | {"temperature": 1.0, "seed": 7, "logprobs": True, "top_logprobs": 2})
    assert out["model"] == ADAPTER and len(out["choices"]) == 3
    for choice in out["choices"]:
        (call,) = choice["message"]["tool_calls"]
        assert valid(call) and choice["finish_reason"] == "tool_calls", choice
        assert len(choice["logprobs"]["content"]) >= len(call["function"]["arguments"])  # a byte-level tokenizer
    streaming = {"n": 1, "logprobs": True, "stream": True, "stream_options": {"include_usage": True}}
    events = stream(client, "/v1/chat/completions", {**sampled, **streaming})
    scored = [entry for event in events[:-2] for part in event["choices"] for entry in part["logprobs"]["content"]]
    assert len(scored) == events[-2]["usage"]["completion_tokens"]  # every token's, sent before its call is whole


BAD = [
    ({"tool_choice": named("sunshine")}, "tool_choice", "not one of the tools"),
    ({"tool_choice": "required", "tools": None}, "tool_choice", "needs tools"),
    ({"tool_choice": "sometimes"}, "tool_choice", "'none', 'auto' or 'required'"),
    ({"tool_choice": named("weather"), "response_format": {"type": "json_object"}}, "tool_choice", "not with"),
    ({"tool_choice": "required", "structured_outputs": {"regex": "a"}}, "tool_choice", "not with"),
    ({"tool_choice": "required", "guided_choice": ["a"]}, "tool_choice", "not with"),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}], "tool_choice": "none"}, "tools.0.type", "function"),
    ({"tools": [TOOLS[0]] * 2, "tool_choice": "none"}, "tools", "more than one function of that name"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools", "at most 128"),
    ({"tools": [{"type": "function", "function": {"name": ""}}], "tool_choice": "none"}, "tools.0.function.name", ""),
    (
        {
            "tools": [{"type": "function", "function": {"name": "x", "parameters": {"$ref": "#/nowhere"}}}],
            "tool_choice": named("x"),
        },
        "tools.0.function.parameters",
        "structured output",
    ),
    (
        {
            "tools": [*TOOLS, {"type": "function", "function": {"name": "x", "parameters": {"$ref": "#/nowhere"}}}],
            "tool_choice": "required",
        },
        "tools",
        "structured output",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]},
        "tools.0.function.parameters",
        "the arguments are an object",
    ),
]
BAD_MESSAGES = [
    ([{"role": "user", "content": None}], "messages.0", "content: needed"),
    ([{"role": "user", "content": "x", "tool_calls": HISTORY[1]["tool_calls"]}], "messages.0", "only on an assistant"),
    ([{"role": "user", "content": "x", "tool_call_id": "call-1"}], "messages.0", "only on a tool message"),
    (
        [{"role": "assistant", "tool_calls": [{"function": {"name": "weather", "arguments": "[1]"}}]}],
        "messages.0.tool_calls.0.function.arguments",
        "JSON text of an object",
    ),
    (
        [{"role": "assistant", "tool_calls": [{"function": {"name": "weather", "arguments": "{"}}]}],
        "messages.0.tool_calls.0.function.arguments",
        "JSON text of an object",
    ),
]


@pytest.mark.parametrize("fields, param, message", BAD + [({"messages": m}, p, s) for m, p, s in BAD_MESSAGES])
def test_bad_tools_are_a_400_that_names_the_field(served, fields, param, message):
    client, body, _ = served
    response = client.post("/v1/chat/completions", json={**body, "tool_choice": "required", **fields})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"].startswith(param) and message in error["message"], error


def test_tokenize_takes_tools_and_the_tool_messages_as_the_chat_route(served):
    client, _, tokenizer = served
    assert client.post("/tokenize", json={"messages": ASK, "tools": TOOLS}).json()["tokens"] == encode_chat(
        tokenizer, ASK, tools=TOOLS
    )
    response = client.post("/tokenize", json={"prompt": "x", "tools": TOOLS})
    assert response.status_code == 400 and "tools: only with messages" in response.json()["error"]["message"]
