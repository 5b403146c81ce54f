"""The generation path shared by the native and OpenAI routes: validate, resolve the adapter,
submit to the engine, and consume the stream under a timeout that also watches for disconnects.
Every failure before the engine becomes a 4xx/503 APIError; nothing invalid reaches the engine.
Prompts are bounded in characters before tokenizing, and tokenizing runs off the event loop, so a
huge prompt neither stalls other requests nor costs more than a length check."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import Future
from dataclasses import dataclass

from fastapi import Request

from server.adapters.registry import AdapterIncompatible, AdapterNotFound, Lease
from server.adapters.store import InvalidName
from server.api.deps import AppState
from server.api.errors import APIError
from server.api.schemas import ChatMessage, ChatTemplateFields
from server.api.structured_outputs import check_grammar
from server.engine.async_engine import EngineOverloaded, EngineStopped, GenerationRequest, RequestOutput, RequestStream
from server.engine.sampling_params import SamplingParams
from server.metrics import BASE_LABEL
from server.tokenization import ChatTemplateMissing, encode_chat, encode_prompt

DISCONNECT_POLL_SECONDS = 0.25
RETRY_AFTER_SECONDS = "1"
EXPIRY_SLACK_SECONDS = 1.0  # past a stream's deadline, when a consumer stuck in a send is given up


def check_text(value: str, field: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{field}: not valid UTF-8 (lone surrogate)", param=field) from None
    return value


def check_prompt_chars(state: AppState, chars: int, field: str) -> None:
    limit = state.max_prompt_chars
    if chars > limit:
        raise APIError(
            400, f"{field}: the prompt has {chars} characters; the limit is {limit} (max_prompt_chars)", param=field
        )


async def tokenize(
    state: AppState, prompt: str | list[int], field: str = "prompt", add_special_tokens: bool = True
) -> list[int]:
    if isinstance(prompt, str):
        check_prompt_chars(state, len(prompt), field)
        ids = await asyncio.to_thread(encode_prompt, state.tokenizer, check_text(prompt, field), add_special_tokens)
    else:
        check_length(state, prompt, 0, field)
        check_token_ids(state, prompt, field)
        ids = list(prompt)
    if not ids:
        raise APIError(400, f"{field}: the prompt is empty", param=field)
    return ids


async def tokenize_chat(
    state: AppState, messages: list[ChatMessage], template: ChatTemplateFields, add_special_tokens: bool = False
) -> list[int]:
    tools = template.template_tools()
    tool_chars = len(json.dumps(tools, ensure_ascii=False)) if tools else 0
    check_prompt_chars(state, sum(m.chars() for m in messages) + tool_chars, "messages")
    for i, message in enumerate(messages):
        check_text(message.text(), f"messages.{i}.content")
    try:
        ids = await asyncio.to_thread(
            encode_chat,
            state.tokenizer,
            [message.for_template() for message in messages],
            template.add_generation_prompt,
            template.continue_final_message,
            add_special_tokens,
            template.template_kwargs(),
            tools,
        )
    except ChatTemplateMissing as e:
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # a template may raise anything on messages it does not accept
        raise APIError(400, f"messages: the chat template rejected them ({e})", param="messages") from None
    if not ids:  # a template that adds nothing of its own, over empty messages
        raise APIError(400, "messages: the chat template renders them to an empty prompt", param="messages")
    return ids


def check_token_ids(state: AppState, token_ids, field: str) -> None:
    vocab = state.model.vocab_size
    bad = next((t for t in token_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"{field}: token id {bad} is outside the vocabulary (0..{vocab - 1})", param=field)


def check_length(state: AppState, prompt_ids: list[int], max_new_tokens: int, field: str) -> None:
    limit = state.max_model_len
    if len(prompt_ids) + max_new_tokens > limit:
        raise APIError(
            400,
            f"this model's context window is {limit} tokens; the request needs {len(prompt_ids) + max_new_tokens} "
            f"({len(prompt_ids)} in the prompt, {max_new_tokens} to generate)",
            param=field,
        )


async def acquire_adapter(state: AppState, ref: str, field: str) -> Lease:
    return await adapter_call(state.registry.acquire(ref), field)


async def resolve_adapter(state: AppState, ref: str, field: str) -> None:
    """That `ref` names a served adapter (nothing loaded), with acquire_adapter's errors."""
    await adapter_call(state.registry.resolve(ref), field)


async def adapter_call(call: Awaitable, field: str):
    """A registry call's errors as the API's: unknown 404, not servable 422, malformed 400."""
    try:
        return await call
    except AdapterNotFound as e:
        raise APIError(404, str(e), param=field) from None
    except AdapterIncompatible as e:
        raise APIError(422, str(e), param=field) from None
    except (InvalidName, ValueError) as e:
        raise APIError(400, str(e), param=field) from None


@dataclass
class Running:
    """A submitted request and the adapter lease it holds until it ends."""

    stream: RequestStream
    lease: Lease | None
    compiled: Future | None = None  # its grammar's compile: an engine in this process finds it while it is held

    @property
    def adapter_label(self) -> str:
        return self.lease.adapter.name if self.lease else BASE_LABEL

    def close(self) -> None:
        self.stream.cancel()
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def check_serving(state: AppState) -> None:
    if (problem := state.engine.problem()) is not None:  # e.g. the engine process or a tensor-parallel rank is gone
        raise APIError(503, f"the engine cannot serve: {problem}")
    if state.draining or not state.engine.accepting:
        raise APIError(503, "the server is shutting down or not ready")


async def compile_grammar(state: AppState, grammar: str | None, field: str) -> Future | None:
    """The request's grammar, if any, compiled before it starts (structured_outputs.check_grammar); meanwhile it
    holds a slot of the engine's in-flight bound, so that no more compiles run than requests may be in flight
    (a 429 past that, before any work)."""
    if grammar is None:
        return None
    check_serving(state)
    try:
        with state.engine.reserving():
            return await check_grammar(state.grammars, grammar, field)
    except EngineOverloaded as e:
        raise _submit_error(state, e) from None


async def start(
    state: AppState,
    prompt_ids: list[int],
    sampling: SamplingParams,
    adapter_ref: str | None,
    adapter_field: str,
    length_field: str,
    compiled: Future | None = None,
) -> Running:
    """`compiled`: the compile of the request's grammar (compile_grammar), held while it runs."""
    check_serving(state)
    check_length(state, prompt_ids, sampling.max_new_tokens, length_field)
    check_token_ids(state, [token for token, _ in sampling.logit_bias], "logit_bias")
    lease = await acquire_adapter(state, adapter_ref, adapter_field) if adapter_ref else None
    try:
        stream = state.engine.submit(GenerationRequest(prompt_ids, sampling, lease.adapter if lease else None))
    except Exception as e:
        if lease is not None:
            lease.release()
        raise _submit_error(state, e) from None
    return Running(stream, lease, compiled)


def _submit_error(state: AppState, error: Exception) -> Exception:
    if isinstance(error, EngineOverloaded):
        state.metrics.rejected.labels("overloaded").inc()
        return APIError(429, f"server overloaded: {error}; retry later", headers={"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(error, EngineStopped):
        return APIError(503, str(error))
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    return error


def generation_failed(output: RequestOutput) -> APIError:
    """A request that ended with an error: 503 when the engine stopped under it (another replica, or this one
    restarted, can serve it), else 500."""
    return APIError(503 if output.unavailable else 500, f"generation failed: {output.error}")


async def collect(request: Request, running: Running, timeout: float) -> RequestOutput:
    """Run to completion; cancel on timeout (504) or when the client goes away."""
    task = asyncio.ensure_future(running.stream.collect())
    try:
        async with asyncio.timeout(timeout):
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
                if not task.done() and await request.is_disconnected():
                    running.close()
        return task.result()
    except TimeoutError:
        raise APIError(504, f"the request did not finish within {timeout:g} s and was aborted") from None
    finally:
        task.cancel()
        running.close()


async def stream_outputs(running: Running, timeout: float) -> AsyncIterator[RequestOutput]:
    """Yield outputs, raising TimeoutError once `timeout` seconds have passed; a client disconnect
    cancels this generator, which cancels the request. The deadline covers only the waits for the next
    output: a timeout around the `yield` would cancel the consumer wherever it is (sending the last
    event, say), and the stream would end with no error event."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # The deadline holds while the consumer is stuck in a send to a client that stopped reading, too
    # (uvicorn's send waits for the socket to drain, without a limit): the request is given up then, its
    # slot, adapter lease and undelivered outputs freed. A little later, so that a consumer waiting for
    # output gets its TimeoutError first.
    expiry = loop.call_at(deadline + EXPIRY_SLACK_SECONDS, running.close)
    outputs = aiter(running.stream)
    try:
        while True:
            if loop.time() >= deadline:  # also when outputs are queued, which a wait would take at once
                raise TimeoutError
            async with asyncio.timeout_at(deadline):
                output = await anext(outputs, None)
            if output is None:
                return
            yield output
    finally:
        expiry.cancel()
        running.close()
