"""The grammars of structured outputs, as the routes take them, in llguidance's one format (the engine holds a
request's tokens to it: server/engine/grammar.py). Each is compiled once here, so that a grammar that cannot
be served is the request's 400, never its failure in the engine."""

from __future__ import annotations

import json

import llguidance

from server.engine.grammar import validate

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


def checked(grammar: str) -> str:
    """The grammar, if it compiles; ValueError saying why it does not."""
    validate(grammar)
    return grammar
