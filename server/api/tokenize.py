"""vLLM's POST /tokenize and /detokenize: the token ids a prompt or a chat is served as (BOS, the chat
template, exactly as the generation routes add them), so that clients count and budget tokens as the
server does; and the text of token ids. `model` is resolved as the generation routes resolve it, and
every adapter tokenizes as the base model does."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from server.api.deps import State, require_api_key
from server.api.openai import check_model, check_supported
from server.api.schemas import DetokenizeRequest, TokenizeRequest
from server.api.service import check_length, check_token_ids, tokenize, tokenize_chat

router = APIRouter(tags=["tokenization"], dependencies=[Depends(require_api_key)])


@router.post("/tokenize")
async def tokenize_prompt(body: TokenizeRequest, state: State):
    """The prompt's or the chat's token ids, with their count and the context window they must fit."""
    check_supported(body)
    await check_model(state, body.model)
    if body.messages is not None:
        ids = await tokenize_chat(state, body.messages, body, body.with_special_tokens())
    else:
        ids = await tokenize(state, body.prompt, add_special_tokens=body.with_special_tokens())
    response = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
    if body.return_token_strs:
        response["token_strs"] = await asyncio.to_thread(state.tokenizer.convert_ids_to_tokens, ids)
    return response


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: State):
    """The text of token ids (special tokens included)."""
    await check_model(state, body.model)
    check_length(state, body.tokens, 0, "tokens")
    check_token_ids(state, body.tokens, "tokens")
    return {"prompt": await asyncio.to_thread(state.tokenizer.decode, body.tokens)}
