"""Training data from JSONL, tokenized exactly as the server tokenizes prompts.

Each line is either `{"prompt": ..., "completion": ...}` or `{"messages": [...]}`, a chat whose last
message (role "assistant") is the completion and whose earlier messages are rendered with the chat
template plus the generation prompt. Prompt ids come from `encode_prompt` / `encode_chat`, the
server's own functions, so the positions trained are the positions served. Completions end with
EOS so that the adapter learns to stop. Blank lines are skipped; every other problem is a
ValueError naming the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError

from server.tokenization import ChatTemplateMissing, encode_chat, encode_prompt


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]  # ends with EOS


def load_examples(path: str | Path, tokenizer) -> list[Example]:
    """Every example of a JSONL file; ValueError with the line number on the first bad line."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as lines:
            return parse_examples(lines, tokenizer, source=str(path))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_examples(lines: Iterable[str], tokenizer, source: str = "<data>") -> list[Example]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, so a completion cannot end")
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            examples.append(_parse_line(line, tokenizer, eos))
        except ValueError as e:
            raise ValueError(f"{source}, line {number}: {e}") from None
    if not examples:
        raise ValueError(f"{source}: no training examples (the file is empty)")
    return examples


def _parse_line(line: str, tokenizer, eos: int) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deep)") from None
    if not isinstance(record, dict):
        raise ValueError('expected a JSON object: {"prompt": ..., "completion": ...} or {"messages": [...]}')
    _check_text(record)
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise ValueError("give either 'messages' or 'prompt' and 'completion', not both")
        prompt_ids, completion = _chat_example(record["messages"], tokenizer)
    else:
        prompt_ids, completion = _prompt_completion_example(record, tokenizer)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return Example(tuple(prompt_ids), (*completion_ids, eos))


def _check_text(record: dict) -> None:
    """A lone surrogate escape ("\\ud800") is valid JSON but not text: the tokenizer would raise a TypeError."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate escape such as \\ud800, which is not text") from None


def _prompt_completion_example(record: dict, tokenizer) -> tuple[list[int], str]:
    for field in ("prompt", "completion"):
        if field not in record:
            raise ValueError(f"missing field {field!r} (or give 'messages' for chat data)")
        if not isinstance(record[field], str):
            raise ValueError(f"{field!r} must be a string, got {type(record[field]).__name__}")
    if not record["prompt"]:
        raise ValueError("'prompt' is empty: an adapter edits prompt positions, so it needs a prompt")
    return encode_prompt(tokenizer, record["prompt"]), record["completion"]


def _chat_example(messages, tokenizer) -> tuple[list[int], str]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("'messages' must be a list of at least two messages (the prompt, then the assistant's reply)")
    for index, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ValueError(f"messages[{index}] must be an object with string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"the last message is the completion and must have role 'assistant', got {messages[-1]['role']!r}"
        )
    try:
        prompt_ids = encode_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    except ChatTemplateMissing:
        raise ValueError("chat data needs a tokenizer with a chat template; use prompt/completion lines") from None
    except TemplateError as e:
        raise ValueError(f"the chat template rejected these messages ({e})") from None
    return prompt_ids, messages[-1]["content"]
