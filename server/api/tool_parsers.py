"""tool_choice "auto": the model answers in text or calls tools the way it was trained to write calls, and a parser of
that way (`--tool-call-parser`, vLLM's flag and names) reads its output into OpenAI's `content` and `tool_calls`.
`PARSERS` names them, one class per format:
- hermes: each call a JSON object {"name": ..., "arguments": {...}} between <tool_call> and </tool_call>, text around
  them: Hermes 2 Pro, Qwen2.5, Qwen3 and the models trained on their chat templates.
- llama3_json: an answer that is calls, JSON objects {"name": ..., "parameters": {...}} apart by ";": Llama 3.1-3.3.

One reader serves a streamed answer and a whole one alike (a whole answer is read as one piece), so both give the same
content and calls:
- Text goes out as content as it comes, but for what may yet turn out to be a call (the start of a tag; with hermes,
  trailing whitespace too, which may touch a call), held until told apart.
- A call goes out whole, once it is complete, with its arguments as written.
- Whitespace touching a call is dropped.
- What is not a call of one of the tools (not JSON, a name not among them, arguments not an object) is content, as
  written: nothing the model wrote is lost.
"""

from __future__ import annotations

import json
from collections.abc import Collection

from server.api.tool_calls import CallArray, new_call
from server.engine.stop_strings import held_tail


def call_of(text: str, tool_names: Collection[str], argument_keys: tuple[str, ...] = ("arguments",)) -> dict | None:
    """The call a JSON text makes, if it is an object {"name": one of `tool_names`, <the first of `argument_keys` it
    has>: an object (none: no arguments)}; its arguments as written. Python's json only checks the text: it converts
    no number (so none is too large for it, 1e999 or a long integer), and a value too deep for it is not a call."""
    try:
        value = json.loads(text, parse_int=_unread, parse_float=_unread, parse_constant=_refused)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(name := value.get("name"), str) or name not in tool_names:
        return None
    key = next((key for key in argument_keys if key in value), None)
    if key is not None and not isinstance(value[key], dict):
        return None
    (members,) = CallArray().feed(f"[{text}]")  # the object's members as written
    return new_call(name, members[key] if key is not None else "{}")


def _unread(_: str) -> None:
    return None


def _refused(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


class TextAndCalls:
    """What a parser has read of an answer so far (`content`, `calls`), and what the piece being read gave out. What
    grows with the answer is kept in pieces and joined once, so that a long answer streamed is read in linear time
    (this runs on the event loop)."""

    keeps_special_tokens = True  # a format's markers are special tokens in some tokenizers; vLLM's parsers read them

    def __init__(self, tool_names: Collection[str], parallel: bool = True):
        """`parallel`: parallel_tool_calls; false, the calls after the first are left out (vLLM's; OpenAI makes one)."""
        self.tool_names = frozenset(tool_names)
        self.parallel = parallel
        self.calls: list[dict] = []
        self._content: list[str] = []
        self._out: tuple[list[str], list[dict]] = ([], [])

    @property
    def content(self) -> str:
        return "".join(self._content)

    def read(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """The content and call deltas of `text`, the answer's next piece (`final`: its last); each call delta in
        OpenAI's streamed shape, whole: its index, id, type, name and arguments."""
        self._read(text, final)
        content, calls = self._out
        self._out = ([], [])
        return "".join(content), calls

    def finish_reason(self, reason: str | None) -> str | None:
        """Where the answer called tools and ended as it meant to, "tool_calls"; a cut answer says why it was cut."""
        return "tool_calls" if self.calls and reason == "stop" else reason

    def message(self) -> dict:
        """The whole answer as OpenAI's message: no content (null) where it is only calls."""
        if not self.calls:
            return {"role": "assistant", "content": self.content}
        return {"role": "assistant", "content": self.content or None, "tool_calls": self.calls}

    def _read(self, text: str, final: bool) -> None:
        raise NotImplementedError

    def _emit(self, content: str) -> None:
        if content:
            self._content.append(content)
            self._out[0].append(content)

    def _emit_call(self, call: dict) -> None:
        """A call read: answered, unless one was and calls are not parallel (then a call all the same, no content)."""
        if self.calls and not self.parallel:
            return
        self.calls.append(call)
        self._out[1].append({"index": len(self.calls) - 1, **call, "function": dict(call["function"])})


class HermesCalls(TextAndCalls):
    """hermes: each call between <tool_call> and </tool_call>, text around them. Content on either side of calls keeps
    the whitespace that stood before them. A block that is no call is content, tags included; so is one left open at
    the end, unless what it holds is a whole call (a model stopping before its closing tag)."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, tool_names: Collection[str], parallel: bool = True):
        super().__init__(tool_names, parallel)
        self._pending = ""  # read, not given out yet: what may begin the next tag (or holds one whole)
        self._in_block = False  # a block's START tag is read, not yet its END
        self._body: list[str] = []  # the open block's text, but for _pending
        self._spaces: list[str] = []  # trailing whitespace held: given out before more content, dropped before a call
        self._block_spaces = ""  # the whitespace dropped before the open block: given back if it is no call
        self._after_call = False  # whitespace read now touches the call before it
        self._gap = ""  # the whitespace before the last run of calls: between content on either side of them

    def _read(self, text: str, final: bool) -> None:
        self._pending += text
        while self._next_tag_read():
            pass
        if final:
            self._end()
        else:  # all of the text, but what may begin the tag to come
            tag = self.END if self._in_block else self.START
            read = len(self._pending) - held_tail(self._pending, (tag,))
            if self._in_block:
                self._body.append(self._pending[:read])
            else:
                self._text(self._pending[:read])
            self._pending = self._pending[read:]

    def _next_tag_read(self) -> bool:
        """Read up to the next tag in _pending, if there is one whole."""
        tag = self.END if self._in_block else self.START
        at = self._pending.find(tag)
        if at < 0:
            return False
        before, self._pending = self._pending[:at], self._pending[at + len(tag) :]
        if self._in_block:
            self._block(closed=True, rest=before)
        else:
            self._text(before)
            spaces, self._spaces = "".join(self._spaces), []
            if not self._after_call:
                self._gap = spaces
            self._block_spaces = spaces  # dropped, unless the block is no call
        self._in_block = not self._in_block
        return True

    def _block(self, closed: bool, rest: str) -> None:
        """The open block ends (`closed`: with its END tag), `rest` its text after _body."""
        body, self._body = "".join(self._body) + rest, []
        call = call_of(body, self.tool_names)
        if call is None:
            self._spaces = [self._block_spaces]
            self._text(self.START + body + (self.END if closed else ""))
            return
        self._emit_call(call)
        self._after_call = True

    def _text(self, text: str) -> None:
        """Content: whitespace after a call dropped, trailing whitespace held (it may touch a call to come)."""
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
            if text and self._content:  # content again: apart from the content before the calls, as it was
                text = self._gap + text
        body = text.rstrip()
        if body:
            self._emit("".join(self._spaces) + body)
            self._spaces = []
        if len(body) < len(text):
            self._spaces.append(text[len(body) :])

    def _end(self) -> None:
        if self._in_block:
            self._block(closed=False, rest=self._pending)
        else:
            self._text(self._pending)
        self._pending, self._in_block = "", False
        if not self._after_call:  # whitespace at the very end touches no call
            self._emit("".join(self._spaces))
        self._spaces = []


class Llama3JsonCalls(TextAndCalls):
    """llama3_json: an answer that calls tools starts with a call, a JSON object {"name": ..., "parameters": {...}}
    ("arguments" taken too), maybe after <|python_tag|>, and more follow after ";"; any other answer is text. What
    breaks the calls (something neither a call nor ";" or whitespace between them, or a call that is no call of the
    tools, or one left open at the end) is content from there on, as written: the whole answer if no call came
    before it. ";" and whitespace between calls are dropped."""

    PYTHON_TAG = "<|python_tag|>"
    ARGUMENT_KEYS = ("parameters", "arguments")

    def __init__(self, tool_names: Collection[str], parallel: bool = True):
        super().__init__(tool_names, parallel)
        self._mode: str | None = None  # "calls" or "text", once the answer's first characters tell
        self._held: list[str] = []  # while undecided: the answer so far (whitespace, maybe the start of the tag)
        self._blank = True  # _held is whitespace alone
        self._raw: list[str] | None = None  # in calls, until a call is read: the answer so far (content if none is)
        self._object: list[str] = []  # in calls: the pieces of the object being read, but for the piece in hand
        self._depth = 0  # in calls: of the object being read (0: between calls)
        self._in_string = False
        self._escaped = False

    def _read(self, text: str, final: bool) -> None:
        if self._mode is None:
            text = self._decide(text, final)
        if self._mode == "calls":
            self._read_calls(text)
            if final and self._mode == "calls":
                self._end_calls()
        elif self._mode == "text":
            self._emit(text)

    def _decide(self, text: str, final: bool) -> str:
        """Calls if the answer starts with one, else text; undecided while it may yet be (whitespace, the tag's start,
        held). Returns what of the answer is left to read once decided."""
        self._held.append(text)
        if self._blank and not text.strip() and not final:
            return ""  # whitespace alone so far: joined once something else comes
        held = "".join(self._held)
        start = held.lstrip()
        self._held, self._blank = [held], not start
        if start.startswith(self.PYTHON_TAG) or start.startswith("{"):
            self._mode, self._held = "calls", []
            head = len(held) - len(start) + (len(self.PYTHON_TAG) if start.startswith(self.PYTHON_TAG) else 0)
            self._raw = [held[:head]]
            return held[head:]
        if final or (start and not self.PYTHON_TAG.startswith(start)):
            self._mode, self._held = "text", []
            return held
        return ""

    def _read_calls(self, text: str) -> None:
        """Each call whole, once its object closes; a string-aware count of brackets tells where that is."""
        if self._raw is not None:
            self._raw.append(text)
        start = 0  # where the object being read begins in `text` (0: in an earlier piece, or none)
        for at, char in enumerate(text):
            if self._depth == 0:
                if char == "{":
                    start, self._depth = at, 1
                elif not (char.isspace() or char == ";"):
                    return self._break(text[at:])
            elif self._escaped:
                self._escaped = False
            elif self._in_string:
                self._escaped, self._in_string = char == "\\", char != '"'
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    body, self._object = "".join(self._object) + text[start : at + 1], []
                    if (call := call_of(body, self.tool_names, self.ARGUMENT_KEYS)) is None:
                        return self._break(body + text[at + 1 :])
                    self._emit_call(call)
                    self._raw = None
        if self._depth:
            self._object.append(text[start:])
        return None

    def _end_calls(self) -> None:
        """The answer ended in calls: an object left open breaks them, and nothing but the tag is no call."""
        if self._depth or self._raw is not None:
            self._break("".join(self._object))

    def _break(self, rest: str) -> None:
        """The calls are broken: the rest of the answer is text, from `rest` on (from its start, if no call came)."""
        self._mode = "text"
        self._emit("".join(self._raw) if self._raw is not None else rest)
        self._raw, self._object = None, []


PARSERS = {"hermes": HermesCalls, "llama3_json": Llama3JsonCalls}
