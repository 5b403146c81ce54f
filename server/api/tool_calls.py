"""OpenAI's function calling on the chat route, as vLLM serves it for any model, without a parser of the model's own
way of writing calls: a `tool_choice` that forces calls holds the output to a JSON schema (structured outputs, as
`response_format` does), and the text generated is then read back as those calls. A named function's output is that
function's arguments, an instance of its `parameters`; "required"'s is a JSON array of {"name", "parameters"} calls
of the given tools. "auto", where the model may answer in text or call, needs that parser; none is here.

vLLM's shapes: a call's id is "chatcmpl-tool-" and random hex; its `arguments` are the generated text for a named
function, and each call's `parameters` written again as JSON for "required" (whose calls, streamed, come whole, each
as soon as its object is complete: a named function's arguments stream as they are generated)."""

from __future__ import annotations

import json
import re
import uuid

# a function without `parameters` takes none (OpenAI's meaning): its arguments are {}
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# where JSON schemas keep the subschemas their "#/..." references name: the root of the schema
DEFINITIONS = ("$defs", "definitions")
_JSON_SPACE = "[ \t\n\r]*"
_BEFORE_CALL = re.compile(f"{_JSON_SPACE}[\\[,]{_JSON_SPACE}")  # the array's opening, or a comma, before a call
_DECODER = json.JSONDecoder()


def parameters_schema(parameters: dict | None) -> dict:
    return NO_PARAMETERS if parameters is None else parameters


def calls_schema(functions: list[tuple[str, dict | None]], parallel: bool) -> dict:
    """The schema of "required": a JSON array of at least one call (at most one unless `parallel`), each the name of
    one of `functions` (name, parameters) and an instance of its parameters. The functions' definitions move to the
    array's root, where their references ("#/$defs/...") now point; one name defined twice, differently, is a
    ValueError."""
    shared: dict[str, dict] = {}
    calls = []
    for name, parameters in functions:
        parameters = dict(parameters_schema(parameters))
        for key in DEFINITIONS:
            if isinstance(parameters.get(key), dict):
                for definition, schema in parameters.pop(key).items():
                    if shared.setdefault(key, {}).setdefault(definition, schema) != schema:
                        raise ValueError(
                            f"{key}/{definition} is defined twice, differently, among the tools, which "
                            '"required" holds in one schema'
                        )
        properties = {"name": {"type": "string", "enum": [name]}, "parameters": parameters}
        calls.append(
            {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}
        )
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    return {**schema, **shared}


def new_call(name: str, arguments: str) -> dict:
    function = {"name": name, "arguments": arguments}
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function", "function": function}


class ToolCalls:
    """The calls of one choice whose tool_choice forces them, read from its text as it comes (`read`): for the
    function `named`, the text is its one call's arguments; for "required" (named None), a JSON array of calls, each
    read once its object is complete (the grammar makes every complete object a call). `calls`: those read so far."""

    def __init__(self, named: str | None):
        self.named = named
        self.calls: list[dict] = []
        self._text = ""
        self._read_to = 0  # "required": where the text not yet read as calls begins

    def read(self, text: str) -> list[dict]:
        """The deltas of `text`, the output's next piece, in OpenAI's streamed shape: a call's index, and with its
        first delta its id, type and name."""
        self._text += text
        if self.named is None:
            return self._whole_calls() if "}" in text else []  # no object is complete before its "}"
        if self.calls:
            self.calls[0]["function"]["arguments"] = self._text
            return [{"index": 0, "function": {"arguments": text}}] if text else []
        self.calls.append(new_call(self.named, text))
        return [{"index": 0, **self.calls[0], "function": dict(self.calls[0]["function"])}]

    def _whole_calls(self) -> list[dict]:
        read = []
        while (before := _BEFORE_CALL.match(self._text, self._read_to)) is not None:
            try:
                call, self._read_to = _DECODER.raw_decode(self._text, before.end())
            except json.JSONDecodeError:  # not complete yet
                break
            read.append(new_call(call["name"], json.dumps(call["parameters"], ensure_ascii=False)))
        self.calls += read
        first = len(self.calls) - len(read)
        return [{"index": first + i, **call} for i, call in enumerate(read)]

    def finish_reason(self, reason: str | None) -> str | None:
        """vLLM's (and OpenAI's): "tool_calls" where "required" calls ended as they should; a named function's call
        ends as text does ("stop"), and a cut-off output (its last call incomplete, left out) says why."""
        return "tool_calls" if self.named is None and reason == "stop" else reason
