"""Prompt tokenization shared by the server, the trainer and the tests, so all see the same ids.

Raw prompts: the tokenizer's own special tokens, plus BOS prepended when the tokenizer has a BOS of
its own (distinct from EOS) and did not add it; pyreft serves prompts with BOS first, and ReFT
positions count it. Chat: the tokenizer's chat template renders text that already holds any special
tokens, which is then tokenized without adding more (as vLLM does).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence


class ChatTemplateMissing(ValueError):
    pass


def encode_prompt(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """`add_special_tokens=False`: the text's own tokens alone."""
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if not add_special_tokens:
        return ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and bos != eos and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def render_chat(
    tokenizer,
    messages: Sequence[dict],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: Mapping[str, object] | None = None,
    tools: Sequence[dict] | None = None,
) -> str:
    """`continue_final_message`: the last message left open, for the model to go on with it; `template_kwargs`:
    more variables for the template (none of `reserved_template_names()`); `tools`: the functions the model may
    call, as JSON schemas of OpenAI's shape, which a template without tools leaves out."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateMissing("this model's tokenizer has no chat template; use /v1/completions with a prompt")
    return tokenizer.apply_chat_template(
        list(messages),
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tools=list(tools) if tools else None,
        tokenize=False,
        **(template_kwargs or {}),
    )


@functools.cache
def reserved_template_names() -> frozenset[str]:
    """What a chat's template variables may not be named: apply_chat_template's own arguments, which would
    change how it renders or what it returns, and `messages`, the chat itself."""
    from transformers import PreTrainedTokenizerBase

    parameters = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    named = {name for name, p in parameters.items() if p.kind is not p.VAR_KEYWORD and name != "self"}
    return frozenset(named | {"messages"})


def encode_chat(
    tokenizer,
    messages: Sequence[dict],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    add_special_tokens: bool = False,
    template_kwargs: Mapping[str, object] | None = None,
    tools: Sequence[dict] | None = None,
) -> list[int]:
    """`add_special_tokens`: those a raw prompt gets, on top of the template's own (vLLM's meaning)."""
    text = render_chat(tokenizer, messages, add_generation_prompt, continue_final_message, template_kwargs, tools)
    return encode_prompt(tokenizer, text, add_special_tokens)
