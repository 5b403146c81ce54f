"""tool_choice "auto" with --tool-call-parser: the output read as content and calls (hermes: <tool_call> blocks;
llama3_json: an answer of ";"-separated JSON calls), streamed exactly as whole (every way of cutting the text into
pieces gives the same content and calls); what is no call of the tools kept as content; served end to end (the tiny
model held to a hermes answer by structured outputs), with the tokenizer's special tokens kept in the text the parser
reads."""

import random
import time

import pytest

from server.api.tool_parsers import PARSERS, HermesCalls, call_of
from server.config import Settings
from tests.api_utils import running_app, stream

TOOLS = ("weather", "time")


def read_whole(parser: str, text: str):
    reader = PARSERS[parser](TOOLS)
    reader.read(text, final=True)
    return reader


def read_in_pieces(parser: str, text: str, cuts: list[int], parallel: bool = True) -> tuple[str, list[dict]]:
    """The content and calls that streaming `text`, cut at `cuts`, gives out."""
    reader, content, calls = PARSERS[parser](TOOLS, parallel), "", []
    bounds = [0, *cuts, len(text)]
    for i, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        piece_content, deltas = reader.read(text[start:end], final=i == len(bounds) - 2)
        content += piece_content
        calls += deltas
    return content, calls


def shape(calls: list[dict]) -> list[tuple]:
    return [(call["function"]["name"], call["function"]["arguments"]) for call in calls]


# (output, content (None: calls only), calls as (name, arguments as written))
HERMES = [
    ("Paris is sunny.", "Paris is sunny.", []),
    ("Trailing whitespace stays \n", "Trailing whitespace stays \n", []),
    (
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        None,
        [("weather", '{"city": "Paris"}')],
    ),
    (
        'Let me look.\n<tool_call>{"name": "weather", "arguments": {"city": "Rome"}}</tool_call>\n'
        '<tool_call>{"name": "time", "arguments": {"zone": "CET"}}</tool_call>\n',
        "Let me look.",
        [("weather", '{"city": "Rome"}'), ("time", '{"zone": "CET"}')],
    ),
    # numbers stay as written, however large; a call without arguments takes none
    (
        '<tool_call>{"name": "time", "arguments": {"n": 1e999, "m": 123456789012345678901234567890}}</tool_call>',
        None,
        [("time", '{"n": 1e999, "m": 123456789012345678901234567890}')],
    ),
    ('<tool_call>{"name": "time"}</tool_call>', None, [("time", "{}")]),
    # no call of the tools: content, tags and the whitespace before them included
    ("Hi <tool_call>not json</tool_call>", "Hi <tool_call>not json</tool_call>", []),
    (
        'a <tool_call>{"name": "other", "arguments": {}}</tool_call>',
        'a <tool_call>{"name": "other", "arguments": {}}</tool_call>',
        [],
    ),
    (
        '<tool_call>{"name": "time", "arguments": "{}"}</tool_call>',
        '<tool_call>{"name": "time", "arguments": "{}"}</tool_call>',
        [],
    ),
    (
        '<tool_call>{"name": "time", "arguments": {"x": NaN}}</tool_call>',
        '<tool_call>{"name": "time", "arguments": {"x": NaN}}</tool_call>',
        [],
    ),
    ("<tool_call>" + "[" * 100_000 + "</tool_call>", "<tool_call>" + "[" * 100_000 + "</tool_call>", []),
    # left open at the end: a whole call is one (a model stopping before its closing tag), else content
    ('<tool_call>{"name": "weather", "arguments": {"city": "Rome"}}\n', None, [("weather", '{"city": "Rome"}')]),
    ('Sure <tool_call>{"name": "weather", "argu', 'Sure <tool_call>{"name": "weather", "argu', []),
    # what might have begun a tag is content once it does not
    ("a <tool_ca", "a <tool_ca", []),
    ("x < y and <tool> </tool_call>", "x < y and <tool> </tool_call>", []),
    # text between and after calls is content, the whitespace touching the calls dropped
    (
        '<tool_call>{"name": "time", "arguments": {}}</tool_call> then \n<tool_call>{"name": "time", "arguments": {}}'
        "</tool_call> done",
        "then \ndone",
        [("time", "{}"), ("time", "{}")],
    ),
]
LLAMA3_JSON = [
    ("Paris is sunny.", "Paris is sunny.", []),
    ("  Text, then {}", "  Text, then {}", []),
    ('{"name": "weather", "parameters": {"city": "Paris"}}', None, [("weather", '{"city": "Paris"}')]),
    (
        '<|python_tag|>{"name": "weather", "parameters": {"city": "Rome"}}; {"name": "time", "arguments": {}}\n',
        None,
        [("weather", '{"city": "Rome"}'), ("time", "{}")],
    ),
    ('\n{"name": "time", "parameters": {"s": "a \\" } ; {"}}', None, [("time", '{"s": "a \\" } ; {"}')]),
    ('{"name": "time", "parameters": {"n": 1e999}}', None, [("time", '{"n": 1e999}')]),
    # what breaks the calls is content from there on; the whole answer where no call came before
    ('{"name": "time", "parameters": {}}; and more', "and more", [("time", "{}")]),
    (
        '{"name": "time", "parameters": {}} {"name": "other", "parameters": {}}',
        '{"name": "other", "parameters": {}}',
        [("time", "{}")],
    ),
    ('<|python_tag|>{"name": "other", "parameters": {}}', '<|python_tag|>{"name": "other", "parameters": {}}', []),
    ('{"name": "time", "parameters": {"zone": "U', '{"name": "time", "parameters": {"zone": "U', []),
    ('{"name": "time", "parameters": {}}; {"name": "we', '{"name": "we', [("time", "{}")]),
    ("<|python_tag|>", "<|python_tag|>", []),
    ("<|python", "<|python", []),
    ("{" * 100_000 + "}" * 100_000, "{" * 100_000 + "}" * 100_000, []),
]
CASES = [("hermes", *case) for case in HERMES] + [("llama3_json", *case) for case in LLAMA3_JSON]


@pytest.mark.parametrize(("parser", "output", "content", "calls"), CASES)
def test_whole_output_reads_as_content_and_calls(parser, output, content, calls):
    reader = read_whole(parser, output)
    message = reader.message()
    assert message["content"] == content
    assert shape(message.get("tool_calls", [])) == calls
    assert reader.finish_reason("stop") == ("tool_calls" if calls else "stop")
    assert reader.finish_reason("length") == "length"  # a cut answer says it was cut


@pytest.mark.parametrize(("parser", "output", "content", "calls"), [case for case in CASES if len(case[1]) < 1000])
def test_streamed_output_reads_as_the_whole_does_however_it_is_cut(parser, output, content, calls):
    whole = read_whole(parser, output)
    cuttings = [list(range(1, len(output)))]  # a character at a time
    rng = random.Random(0)
    for _ in range(30):
        cuttings.append(sorted(rng.sample(range(1, len(output)), rng.randint(0, min(6, len(output) - 1)))))
    for cuts in cuttings:
        streamed_content, deltas = read_in_pieces(parser, output, cuts)
        assert streamed_content == whole.content, cuts
        assert shape(deltas) == shape(whole.calls)
        assert [delta["index"] for delta in deltas] == list(range(len(deltas)))
        assert all(delta["id"].startswith("chatcmpl-tool-") and delta["type"] == "function" for delta in deltas)


def test_a_call_streams_only_once_its_block_closes():
    reader = HermesCalls(TOOLS)
    assert reader.read("Checking. <tool") == ("Checking.", [])  # the space before a tag may touch a call: held
    assert reader.read('_call>{"name": "time", "arguments": {}}') == ("", [])
    content, deltas = reader.read("</tool_call>")
    assert content == "" and shape(deltas) == [("time", "{}")]


# what answers are made of, for the fuzz below: tags whole and cut, calls valid and not, separators, text
FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<tool_", "</tool", "<|python_tag|>", "<|pyth", "{", "}", ";", " ", "\n", "\u00a0",
    '{"name": "time", "arguments": {}}', '{"name": "weather", "parameters": {"city": "a}\\"b"}}', '{"name": "x"}',
    '{"name": "time", "arguments": [1]}', '"', "\\", "word", "{\"", "<",
]  # fmt: skip


@pytest.mark.parametrize("parser", PARSERS)
def test_random_answers_stream_as_they_read_whole(parser):
    rng = random.Random(parser)
    for _ in range(300):
        output = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 12)))
        cuts = sorted(rng.sample(range(1, len(output)), rng.randint(0, len(output) - 1))) if len(output) > 1 else []
        for parallel in (True, False):
            whole = PARSERS[parser](TOOLS, parallel)
            whole.read(output, final=True)
            content, calls = read_in_pieces(parser, output, cuts, parallel)
            assert (content, shape(calls)) == (whole.content, shape(whole.calls)), (output, cuts)


@pytest.mark.parametrize("parser", PARSERS)
def test_parallel_tool_calls_false_answers_the_first_call_alone(parser):
    """vLLM's: the calls after the first are left out, though still calls (no content, the whitespace touching them
    dropped), streamed as whole."""
    calls = [f'{{"name": "{name}", "arguments": {{}}}}' for name in TOOLS]
    if parser == "hermes":
        output, content = "A " + " ".join(f"<tool_call>{call}</tool_call>" for call in calls) + " B", "A B"
    else:
        output, content = "; ".join(calls) + "; B", "B"
    for cuts in ([], list(range(1, len(output)))):
        streamed_content, deltas = read_in_pieces(parser, output, cuts, parallel=False)
        assert (streamed_content, shape(deltas)) == (content, [("weather", "{}")])


LONG_ANSWERS = {
    "hermes-block": "<tool_call>" + "ab<c" * 100_000,
    "hermes-text": "word" * 200_000,
    "hermes-spaces": "x" + " \n" * 400_000,
    "llama3_json-object": '{"name": "time", "arguments": {"a": "' + "ab}c" * 100_000,
    "llama3_json-spaces": " \n" * 400_000,
    "llama3_json-text": "word" * 200_000,
}


@pytest.mark.parametrize("case", LONG_ANSWERS)
def test_a_long_answer_streams_in_linear_time(case):
    """What grows with the answer is neither copied nor searched again for each piece: copied, 800k characters 4 at a
    time took 4 to 15 s (on the event loop); read once, well under a second."""
    parser, output = case.split("-")[0], LONG_ANSWERS[case]
    reader, started = PARSERS[parser](TOOLS), time.perf_counter()
    for at in range(0, len(output), 4):
        reader.read(output[at : at + 4])
    reader.read("", final=True)
    assert time.perf_counter() - started < 3
    assert reader.content == output


def test_call_of_wants_an_object_naming_a_tool():
    assert (
        call_of('{"name": "time", "arguments": {"zone": "UTC"}}', TOOLS)["function"]["arguments"] == '{"zone": "UTC"}'
    )
    for text in ('["time"]', '{"name": 3}', '{"name": ["time"]}', '{"name": "time", "arguments": [1]}', "{"):
        assert call_of(text, TOOLS) is None, text


def test_every_parser_is_a_settings_choice():
    assert set(PARSERS) == set(Settings.model_fields["tool_call_parser"].annotation.__args__[0].__args__)


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
API_TOOLS = [{"type": "function", "function": {"name": name, "parameters": WEATHER}} for name in TOOLS]
ANSWER = 'Sure.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def literal_regex(text: str) -> str:
    return "".join("\\n" if char == "\n" else "\\" + char if char in ".{}[]()*+?|^$\\" else char for char in text)


@pytest.fixture(scope="module", params=["thread", "process"])
def served(request, tiny_model_dir, tmp_path_factory):
    """The tiny Llama served with the hermes parser; a chat body with tools whose output structured outputs hold to
    `ANSWER` (the random model writes no calls of its own)."""
    store = tmp_path_factory.mktemp("store")
    settings = {"engine_core": request.param, "device": "cpu", "tool_call_parser": "hermes"}
    with running_app(tiny_model_dir("llama"), store, **settings) as client:
        body = {
            "model": client.get("/v1/models").json()["data"][0]["id"],
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": API_TOOLS,
            "max_tokens": 128,
            "structured_outputs": {"regex": literal_regex(ANSWER)},
        }
        yield client, body


def test_auto_reads_the_calls_the_model_writes(served):
    client, body = served
    for choice in ({}, {"tool_choice": "auto"}):
        response = client.post("/v1/chat/completions", json=body | choice)
        assert response.status_code == 200, response.text
        (answer,) = response.json()["choices"]
        assert answer["finish_reason"] == "tool_calls"
        assert answer["message"]["content"] == "Sure."
        assert shape(answer["message"]["tool_calls"]) == [("weather", '{"city": "Paris"}')]


def test_auto_streams_content_then_the_whole_call(served):
    client, body = served
    *chunks, done = stream(client, "/v1/chat/completions", body | {"stream": True})
    assert done == "[DONE]"
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert "".join(delta.get("content", "") for delta in deltas) == "Sure."
    calls = [call for delta in deltas for call in delta.get("tool_calls", [])]
    assert shape(calls) == [("weather", '{"city": "Paris"}')] and calls[0]["index"] == 0
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks if chunk["choices"]][-1] == "tool_calls"


def test_auto_with_parallel_tool_calls_false_answers_one_call(served):
    client, body = served
    second = '\n<tool_call>\n{"name": "time", "arguments": {"city": "Rome"}}\n</tool_call>'
    body = body | {"parallel_tool_calls": False, "max_tokens": 256}
    body["structured_outputs"] = {"regex": literal_regex(ANSWER + second)}
    (answer,) = client.post("/v1/chat/completions", json=body).json()["choices"]
    assert shape(answer["message"]["tool_calls"]) == [("weather", '{"city": "Paris"}')], answer
    *chunks, _ = stream(client, "/v1/chat/completions", body | {"stream": True})
    calls = [call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert shape(calls) == [("weather", '{"city": "Paris"}')]


def test_auto_reads_text_with_special_tokens_kept(served):
    """The parser reads the tokenizer's special tokens (hermes tags are some tokenizers'), as vLLM's does; "none" is
    plain text, where they are left out."""
    client, body = served
    forced_bos = {"max_tokens": 1, "logit_bias": {"1": 100}, "structured_outputs": None}
    auto = client.post("/v1/chat/completions", json=body | forced_bos).json()["choices"][0]
    assert auto["message"] == {"role": "assistant", "content": "<|bos|>"} and auto["finish_reason"] == "length"
    none = client.post("/v1/chat/completions", json=body | forced_bos | {"tool_choice": "none"}).json()["choices"][0]
    assert none["message"]["content"] == ""
