"""The grammars of structured outputs, as the routes take them, in llguidance's one format (the engine holds a
request's tokens to it: server/engine/grammar.py). Each is compiled over the model's tokenizer before the
request reaches the engine, off the event loop (`check_grammar`), so that a grammar that cannot be served is
the request's 400, never its failure in the engine."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Future

import llguidance

from server.api.errors import APIError
from server.engine.grammar import UNAVAILABLE, Grammars

ANY_JSON_OBJECT = {"type": "object"}


def json_schema_grammar(schema: dict | str, any_whitespace: bool = True) -> str:
    """A JSON schema, as an object or as its JSON text; without `any_whitespace`, the JSON is compact (no
    whitespace a model could run on with, vLLM's disable_any_whitespace) unless the schema's own
    `x-guidance` says otherwise."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": any_whitespace})


def regex_grammar(pattern: str) -> str:
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def choice_grammar(choices: list[str]) -> str:
    """Exactly one of the strings."""
    return lark_grammar("start: " + " | ".join(lark_string(choice) for choice in choices))


def lark_string(text: str) -> str:
    """`text` as a Lark string literal: JSON's, with DEL escaped too (llguidance's lexer refuses it raw)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def lark_grammar(text: str) -> str:
    """A Lark grammar, in llguidance's dialect (its start rule: `start`)."""
    return llguidance.grammar_from("lark", text)


async def check_grammar(grammars: Grammars | None, grammar: str, field: str) -> Future:
    """A 400 naming `field` unless the engine can hold a request to `grammar`: compiled over the model's tokenizer
    on a thread of its own, as the engine compiles it. The compile, which the request holds until the engine
    has it: an engine in this process finds it done (grammar.py)."""
    if grammars is None:
        raise APIError(400, UNAVAILABLE, param=field)
    compiled = grammars.compile(grammar)
    try:
        await asyncio.wrap_future(compiled)
    except ValueError as e:
        raise APIError(400, str(e), param=field) from None
    return compiled
