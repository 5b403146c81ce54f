"""OpenAI's function calling on the chat route, as vLLM serves it for any model, without a parser of the model's own
way of writing calls: a `tool_choice` that forces calls holds the output to a JSON schema (structured outputs, as
`response_format` does), and the text generated is then read back as those calls. A named function's output is that
function's arguments, an instance of its `parameters`; "required"'s is a JSON array of {"name", "parameters"} calls
of the given tools. "auto", where the model may answer in text or call, needs that parser (tool_parsers.py).

vLLM's shapes: a call's id is "chatcmpl-tool-" and random hex; its `arguments` are the generated text of the arguments,
as written (a named function's whole output; each "required" call's `parameters`). Streamed, a named function's
arguments come as they are generated, and "required"'s calls whole, each as soon as its object is complete.
A call's arguments are always a JSON object, as OpenAI's are: a function's `parameters` describe one."""

from __future__ import annotations

import json
import uuid
from typing import Protocol

# a function without `parameters` takes none (OpenAI's meaning): its arguments are {}
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# the keywords of a schema whose values are data, not schemas: a "$ref" key there is a value, not a reference
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def parameters_schema(parameters: dict | None) -> dict:
    """The schema a call's arguments are held to: an object (`parameters` that say no type, {} say, would allow
    any JSON value; FunctionDefinition refuses another type)."""
    if parameters is None:
        return NO_PARAMETERS
    return parameters if "type" in parameters else {**parameters, "type": "object"}


def calls_schema(functions: list[tuple[str, dict | None]], parallel: bool) -> dict:
    """The schema of "required": a JSON array of at least one call (at most one unless `parallel`), each the name of
    one of `functions` (name, parameters) and an instance of its parameters. Each function's parameters move whole
    under the root's $defs, their own references ("#", "#/properties/a", "#/$defs/d") moved with them: they name
    what they named in the function's schema."""
    definitions, calls = {}, []
    for i, (name, parameters) in enumerate(functions):
        root = f"#/$defs/tool{i}"
        definitions[f"tool{i}"] = _moved_to(parameters_schema(parameters), root)
        properties = {"name": {"type": "string", "enum": [name]}, "parameters": {"$ref": root}}
        calls.append(
            {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}
        )
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    return {**schema, "$defs": definitions}


def _moved_to(schema, root: str):
    """`schema` with its local references ("#...") made to start at `root`, where it now lives."""
    if isinstance(schema, list):
        return [_moved_to(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    moved = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            moved[key] = root + value[1:]
        else:
            moved[key] = value if key in DATA_KEYWORDS else _moved_to(value, root)
    return moved


def new_call(name: str, arguments: str) -> dict:
    function = {"name": name, "arguments": arguments}
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function", "function": function}


class CallReader(Protocol):
    """Reads a choice's output as tool calls: a whole output is read as one final piece, so that a streamed output
    and a whole one give the same content and calls."""

    keeps_special_tokens: bool  # the output is to be read with the tokenizer's special tokens in it

    def read(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """The content and the call deltas (OpenAI's streamed shape) of the output's next piece."""

    def finish_reason(self, reason: str | None) -> str | None: ...

    def message(self) -> dict:
        """The whole output as OpenAI's message."""


class ToolCalls:
    """The calls of one choice whose tool_choice forces them, read from its text as it comes (`read`): for the
    function `named`, the text is its one call's arguments; for "required" (named None), a JSON array of calls, each
    read once its object is complete (the grammar makes every complete object a call). `message`: the calls read."""

    keeps_special_tokens = False  # the output is JSON, whatever the tokenizer's special tokens

    def __init__(self, named: str | None):
        self.named = named
        self.calls: list[dict] = []  # read so far (a named call's arguments: its first piece, the rest in _arguments)
        self._array = CallArray() if named is None else None
        self._arguments: list[str] = []

    def read(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """The content (none: the output is calls) and call deltas of `text`, the output's next piece, in OpenAI's
        streamed shape: a call's index, and with its first delta its id, type and name. `final` changes nothing:
        an incomplete call is left out (a tool parser's reader takes the same arguments)."""
        if self._array is not None:
            read = [new_call(json.loads(m["name"]), m["parameters"]) for m in self._array.feed(text)]
            self.calls += read
            first = len(self.calls) - len(read)
            return "", [{"index": first + i, **call} for i, call in enumerate(read)]
        if self.calls:
            self._arguments.append(text)  # joined once, in `message` (a string grown by += may be copied each time)
            return "", [{"index": 0, "function": {"arguments": text}}] if text else []
        self.calls.append(new_call(self.named, text))
        return "", [{"index": 0, **self.calls[0], "function": dict(self.calls[0]["function"])}]

    def message(self) -> dict:
        """The whole output as OpenAI's message: its calls, and content "" (vLLM's)."""
        if self._arguments:
            self.calls[0]["function"]["arguments"] += "".join(self._arguments)
            self._arguments = []
        return {"role": "assistant", "content": "", "tool_calls": self.calls}

    def finish_reason(self, reason: str | None) -> str | None:
        """vLLM's (and OpenAI's): "tool_calls" where "required"'s array of calls ended as it should; a named
        function's call ends as text does ("stop"), and an output cut short (by max_tokens, or a stop string: its
        last call incomplete, left out) says why."""
        return "tool_calls" if self._array is not None and self._array.closed and reason == "stop" else reason


class CallArray:
    """ "required"'s output, a JSON array of call objects, read as it grows: each call's members as written, once its
    object is complete. A scan, not a parse: each character is looked at once, and no value is converted (numbers
    of any length, which Python's json would turn into Infinity or refuse) or recursed into (values of any depth)."""

    def __init__(self):
        self.closed = False  # the array's "]" came
        self._pieces: list[str] = []  # the text from _kept on (the call being read), as it came: joined when sliced
        self._kept = 0  # where _pieces begin in the whole text
        self._read = 0  # how much of the whole text was fed
        self._depth = 0  # 1 in the array, 2 in a call, more in its values
        self._string: int | None = None  # where the string being scanned began
        self._escaped = False
        self._key: str | None = None  # the call's member being read
        self._value: int | None = None  # where its value began
        self._members: dict[str, str] = {}

    def feed(self, text: str) -> list[dict[str, str]]:
        """The calls that `text`, the output's next piece, completes: each a member name -> the text of its value."""
        self._pieces.append(text)
        calls = []
        for at, char in enumerate(text, self._read):
            if self._string is not None:
                self._scan_string(char, at)
            elif char == '"':
                self._string = at
            elif char in "[{":
                self._depth += 1
            elif self._depth == 2 and char in ",}":  # a call's member ends, and with "}" the call
                if self._value is not None:
                    self._members[self._key] = self._slice(self._value, at).strip()
                    self._value = None
                if char == "}":
                    calls.append(self._members)
                    self._members, self._depth = {}, 1
                    self._forget_before(at + 1)
            elif char in "]}":
                self._depth -= 1
                self.closed = self._depth == 0
            elif char == ":" and self._depth == 2:
                self._value = at + 1
        self._read += len(text)
        return calls

    def _slice(self, start: int, end: int) -> str:
        """The whole text's [start, end): a few slices per call, so a long call streamed is read in linear time."""
        kept = "".join(self._pieces)
        self._pieces = [kept]
        return kept[start - self._kept : end - self._kept]

    def _forget_before(self, at: int) -> None:
        kept = "".join(self._pieces)
        self._pieces, self._kept = [kept[at - self._kept :]], at

    def _scan_string(self, char: str, at: int) -> None:
        if self._escaped:
            self._escaped = False
        elif char == "\\":
            self._escaped = True
        elif char == '"':
            if self._depth == 2 and self._value is None:  # a member's name
                self._key = json.loads(self._slice(self._string, at + 1))
            self._string = None
