"""The calls the server answers with are calls of the tools as given, whose `arguments` are the JSON text of an
object (OpenAI's; this server's own ChatMessage refuses anything else when the call comes back in the history):
a tool's references keep naming what they named in its schema under "required", a function whose schema says no
type takes an object, and "required"'s calls are read as written, whatever numbers or depth the model wrote."""

import json
import time

import pytest
from transformers import AutoTokenizer

from server.api.tool_calls import ToolCalls
from tests.api_utils import running_app
from tests.test_tool_calls import ASK, TEMPLATE


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    directory = tiny_model_dir("llama")
    with running_app(directory, tmp_path_factory.mktemp("store"), device="cpu", max_model_len=1024) as client:
        client.app.state.reft.tokenizer.chat_template = TEMPLATE
        tokenizer = AutoTokenizer.from_pretrained(directory)
        whitespace = tokenizer(" \n\t\r", add_special_tokens=False)["input_ids"]
        body = {
            "model": client.get("/v1/models").json()["data"][0]["id"],
            "messages": ASK,
            "max_tokens": 400,
            "temperature": 0,
            "logit_bias": {str(token): -100 for token in whitespace},
        }
        yield client, body


def tool(parameters: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


# a tree: its "#" is the tool's parameters, wherever the server puts them
TREE = {
    "type": "object",
    "properties": {"kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 1}},
    "required": ["kids"],
    "additionalProperties": False,
}


def a_tree(value) -> bool:
    return isinstance(value, dict) and value.keys() == {"kids"} and all(a_tree(kid) for kid in value["kids"])


def test_required_keeps_a_tools_reference_to_its_own_root(served):
    client, body = served
    response = client.post("/v1/chat/completions", json={**body, "tools": tool(TREE), "tool_choice": "required"})
    assert response.status_code == 200, response.text
    for call in response.json()["choices"][0]["message"]["tool_calls"]:
        arguments = json.loads(call["function"]["arguments"])
        assert a_tree(arguments), arguments  # "#" was the array of calls: kids were [[{"name": "f", ...}]]


def test_required_takes_a_reference_into_a_tools_properties(served):
    client, body = served
    parameters = {
        "type": "object",
        "properties": {"a": {"enum": [1, 2]}, "b": {"$ref": "#/properties/a"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    for choice in ({"type": "function", "function": {"name": "f"}}, "required"):
        response = client.post("/v1/chat/completions", json={**body, "tools": tool(parameters), "tool_choice": choice})
        assert response.status_code == 200, (choice, response.text)  # "required" was a 400, Pointer not found


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "f"}}, "required"])
def test_a_call_of_a_function_with_empty_parameters_is_an_object(served, tool_choice):
    client, body = served
    request = {**body, "tools": tool({}), "tool_choice": tool_choice, "max_tokens": 40}
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    for call in choice["message"]["tool_calls"]:
        arguments = call["function"]["arguments"]
        assert arguments.lstrip().startswith("{"), call  # an object, even cut short (were 98884..., Infinity)
        if choice["finish_reason"] != "length":
            assert isinstance(strict_json(arguments), dict), call


def calls_of(text: str) -> list[dict]:
    calls = ToolCalls(None)
    calls.read(text)
    return calls.calls


def test_required_arguments_are_json_whatever_number_the_model_wrote():
    (call,) = calls_of('[{"name": "f", "parameters": {"x": 1e999}}]')
    strict_json(call["function"]["arguments"])  # was {"x": Infinity}


def test_required_calls_with_long_numbers_or_deep_values_are_read_not_raised():
    # both are complete outputs of the grammar of {"type": "object"} parameters; Python's JSON decoder raised
    # ValueError (its limit on integer digits) and RecursionError: a 500, a stream cut without [DONE]
    (call,) = calls_of('[{"name": "f", "parameters": {"x": ' + "1" * 5000 + "}}]")
    assert "1" * 5000 in call["function"]["arguments"]
    (call,) = calls_of('[{"name": "f", "parameters": {"x": ' + "[" * 3000 + "]" * 3000 + "}}]")
    assert "[" * 3000 in call["function"]["arguments"]


@pytest.mark.parametrize("named", ["f", None])
def test_a_long_call_streams_in_linear_time(named):
    """A named call's arguments, "required"'s array: what grows with the output is neither copied nor scanned again
    for each piece (copied, "required"'s 1.6M characters read 4 at a time took ~9 s, on the event loop)."""
    arguments = '{"code": "' + "ab, c" * 320_000 + '"}'
    output = (
        arguments if named else f'[{{"name": "f", "parameters": {arguments}}}, {{"name": "f", "parameters": {{}}}}]'
    )
    calls, started = ToolCalls(named), time.perf_counter()
    for at in range(0, len(output), 4):
        calls.read(output[at : at + 4])
    assert time.perf_counter() - started < 3
    assert [call["function"]["arguments"] for call in calls.message()["tool_calls"]][:1] == [arguments]


def test_required_holds_each_call_to_its_own_tools_definitions(tiny_model_dir):
    """Two tools may give one name in $defs different meanings: each call is held to its own tool's."""
    import llguidance
    import llguidance.hf

    from server.api.structured_outputs import json_schema_grammar
    from server.api.tool_calls import calls_schema

    number, text = (
        {"$defs": {"d": {"type": "object", "properties": {"x": {"type": t}}, "required": ["x"]}}, "$ref": "#/$defs/d"}
        for t in ("number", "string")
    )
    grammar = json_schema_grammar(calls_schema([("n", number), ("t", text)], parallel=True), any_whitespace=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    reader = llguidance.hf.from_tokenizer(tokenizer)

    def accepts(output: str) -> bool:
        matcher = llguidance.LLMatcher(reader, grammar)
        return matcher.consume_tokens(tokenizer.encode(output, add_special_tokens=False)) and matcher.is_accepting()

    assert accepts('[{"name":"n","parameters":{"x":1}},{"name":"t","parameters":{"x":"a"}}]')
    assert not accepts('[{"name":"n","parameters":{"x":"a"}}]')
    assert not accepts('[{"name":"t","parameters":{"x":1}}]')


def test_a_stop_string_that_cuts_required_calls_short_says_stop():
    calls = ToolCalls(None)
    calls.read('[{"name": "f", "parameters": {}}, {"name": "f", "par')
    assert len(calls.calls) == 1 and calls.finish_reason("stop") == "stop"
    calls.read('ameters": {}}]')
    assert len(calls.calls) == 2 and calls.finish_reason("stop") == "tool_calls"
