"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions and /v1/models.

The `model` field picks the adapter, as in vLLM and LoRAX: the base model's id means no adapter,
an adapter's name (or name@version) means that adapter.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

from fastapi import APIRouter, Depends, Request

from server.api import sse
from server.api.deps import AppState, State, require_api_key
from server.api.errors import APIError, error_body
from server.api.schemas import ChatCompletionRequest, CompletionRequest, OpenAIFields, TokenizeRequest
from server.api.service import (
    Running,
    collect,
    compile_grammar,
    generation_failed,
    resolve_adapter,
    start,
    stream_outputs,
    tokenize,
    tokenize_chat,
)
from server.api.token_texts import TokenTexts
from server.api.tool_calls import CallReader, ToolCalls
from server.api.tool_parsers import PARSERS
from server.engine.async_engine import RequestOutput
from server.engine.sampler import Sample
from server.engine.sampling_params import MAX_SEED, SamplingParams
from server.engine.sequence import FinishReason

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])


def adapter_for_model(state: AppState, model: str | None) -> str | None:
    return None if model == state.model_name else model


@contextmanager
def model_lookup(state: AppState, model: str) -> Iterator[None]:
    """An adapter the store lacks, named by `model`: the 404 says what `model` may name."""
    try:
        yield
    except APIError as e:
        if e.status != 404:
            raise
        message = f"model {model!r} not found: it is neither the base model {state.model_name!r} nor an adapter"
        raise APIError(404, message, param="model") from None


async def check_model(state: AppState, model: str | None) -> None:
    """`model` resolved as the generation routes resolve it, with their 404, nothing loaded."""
    if (adapter := adapter_for_model(state, model)) is not None:
        with model_lookup(state, model):
            await resolve_adapter(state, adapter, "model")


def check_supported(body: OpenAIFields | TokenizeRequest) -> None:
    if problem := body.unsupported():
        raise APIError(400, problem, param=problem.split(":")[0].split(" ")[0])


def tool_call_reader(body: ChatCompletionRequest, parser: str | None) -> Callable[[], CallReader] | None:
    """What reads a choice's output as tool calls (None where tool_choice is "none": text): for "auto", the server's
    parser of the model's way of writing them; else the calls that structured outputs force (tool_calls.py)."""
    mode = body.tool_mode()
    if mode == "none":
        return None
    if mode != "auto":
        return partial(ToolCalls, body.named_function())
    if parser is None:
        raise APIError(
            400,
            'tool_choice: "auto" (the default where tools are given) needs a parser of the model\'s tool calls, and '
            'this server was started without one (--tool-call-parser); give "required" (the output is calls of the '
            'tools), a named function ({"type": "function", "function": {"name": ...}}) or "none"',
            param="tool_choice",
        )
    return partial(PARSERS[parser], [tool.function.name for tool in body.tools], body.parallel_tool_calls)


def check_choices(state: AppState, prompts: int, n: int) -> None:
    """Every choice of every prompt is a request of its own: max_prompts bounds them all."""
    if prompts * n <= state.max_prompts:
        return
    limit = state.max_prompts
    if n == 1:
        raise APIError(400, f"prompt: {prompts} prompts in one request; the limit is {limit}", param="prompt")
    message = f"n: {prompts} prompt(s) x n={n} make {prompts * n} completions; the limit is {limit}"
    raise APIError(400, message, param="n")


async def start_model(state: AppState, prompt_ids: list[int], body: OpenAIFields, sampling, compiled) -> Running:
    with model_lookup(state, body.model):
        adapter = adapter_for_model(state, body.model)
        return await start(state, prompt_ids, sampling, adapter, "model", "max_tokens", compiled)


def finish_reason(output: RequestOutput) -> str | None:
    if output.finish_reason is FinishReason.ERROR:
        raise generation_failed(output)
    return output.finish_reason.value if output.finish_reason else None


def usage(prompt_tokens: int, outputs: list[RequestOutput]) -> dict:
    """`prompt_tokens`: each prompt's once, however many choices it has."""
    completion = sum(o.completion_tokens for o in outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def choice_sampling(sampling: SamplingParams, choice: int) -> SamplingParams:
    """Choice `choice` of n: with a seed, seed + choice, so the n samples differ yet each is reproducible."""
    if sampling.seed is None or choice == 0:
        return sampling
    return replace(sampling, seed=(sampling.seed + choice) % (MAX_SEED + 1))


async def start_choices(state: AppState, prompts: list[list[int]], body: OpenAIFields, sampling) -> list[Running]:
    """`body.n` requests per prompt, in choice-index order (prompt by prompt); all closed if one cannot start."""
    compiled = await compile_grammar(state, sampling.grammar, body.structure_field())
    runs = []
    try:
        for prompt_ids in prompts:
            for choice in range(body.n):
                runs.append(await start_model(state, prompt_ids, body, choice_sampling(sampling, choice), compiled))
    except BaseException:
        close_all(runs)
        raise
    return runs


def close_all(runs: list[Running]) -> None:
    for running in runs:
        running.close()


# -- logprobs in OpenAI's two shapes ----------------------------------------------------------------
def completion_logprobs(texts: TokenTexts, samples: list[Sample], text_offset: int = 0) -> dict:
    tokens = [texts(s.token) for s in samples]
    offsets, position = [], text_offset
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [s.logprob for s in samples],
        "top_logprobs": [{texts(t): lp for t, lp in s.top_logprobs or []} for s in samples],
        "text_offset": offsets,
    }


def echoed_logprobs(texts: TokenTexts, prompt_ids: list[int], scored: list[Sample], top: int) -> dict:
    """The prompt's part of an echoed completion's logprobs, with the `top` most likely tokens: the first
    token, which nothing before it scores, has null for its logprob and its top logprobs, as in OpenAI's
    and vLLM's."""
    trimmed = [replace(sample, top_logprobs=sample.top_logprobs[:top]) for sample in scored]
    part = completion_logprobs(texts, [Sample(prompt_ids[0]), *trimmed])
    part["top_logprobs"][0] = None
    return part


def vllm_prompt_logprobs(texts: TokenTexts, output: RequestOutput, top: int) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs` of an output: per prompt token, null for the first, else {token id: {logprob,
    rank, decoded_token}} for the token itself and the `top` most likely tokens; null if the request was
    given up before its prompt was scored."""
    if output.prompt_logprobs is None:
        return None

    def entry(token: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": texts(token)}

    positions: list[dict | None] = [None]
    for sample in output.prompt_logprobs:
        position = {sample.token: entry(sample.token, sample.logprob, sample.rank)}
        for rank, (token, logprob) in enumerate(sample.top_logprobs[:top], start=1):
            position.setdefault(token, entry(token, logprob, rank))
        positions.append(position)
    return positions


def offset_after(logprobs: dict) -> int:
    """The text offset that tokens after these completion logprobs (not empty) begin at."""
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


def joined_logprobs(prompt_part: dict, texts: TokenTexts, samples: list[Sample]) -> dict:
    """An echoed prompt's logprobs followed by the generated tokens', whose offsets go on after the prompt's."""
    generated = completion_logprobs(texts, samples, offset_after(prompt_part))
    return {key: prompt_part[key] + generated[key] for key in generated}


def chat_logprobs(texts: TokenTexts, samples: list[Sample]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = texts(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs or []]}
            for s in samples
        ]
    }


def echo_text(tokenizer, prompt: str | list[int], prompt_ids: list[int]) -> str:
    """The prompt as echoed: as sent, or a token-id prompt decoded."""
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids)


# -- streaming ---------------------------------------------------------------------------------------
async def merged(runs: list[Running], timeout: float) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the request's index."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, running: Running) -> None:
        try:
            async for output in stream_outputs(running, timeout):
                await queue.put((index, output))
        except BaseException as e:  # surface timeouts and errors to the consumer
            await queue.put((index, e))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(runs)]
    remaining = len(runs)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        close_all(runs)


async def openai_events(
    runs: list[Running], timeout: float, chunk, include_usage: bool, base: dict, usage_of
) -> AsyncIterator[str]:
    """SSE for both routes; `chunk(index, output)` builds one choice (None: no event), `usage_of(final outputs)`
    the usage."""
    finals: dict[int, RequestOutput] = {}
    no_usage = {"usage": None} if include_usage else {}  # OpenAI's chunks say null until the last one
    try:
        async for index, output in merged(runs, timeout):
            if output.finished:
                finals[index] = output
            if (part := chunk(index, output)) is not None:
                yield sse.event({**base, "choices": [part], **no_usage})
        if include_usage:
            yield sse.event({**base, "choices": [], "usage": usage_of(list(finals.values()))})
    except TimeoutError:
        yield sse.event(error_body(504, f"the request did not finish within {timeout:g} s and was aborted"))
    except APIError as e:
        yield sse.event(error_body(e.status, e.message))
    yield sse.DONE


# -- routes ------------------------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State):
    """OpenAI text completions; `model` = the base model id or an adapter name."""
    check_supported(body)
    texts = body.prompts()
    check_choices(state, len(texts), body.n)
    prompts = [await tokenize(state, prompt) for prompt in texts]
    generates = body.max_tokens > 0  # else (echo): the prompt alone, the one token drawn dropped, as vLLM's
    sampling = body.sampling(max(1, body.max_tokens), body.logprobs, body.prompt_scores())
    runs = await start_choices(state, prompts, body, sampling)
    prompt_tokens = sum(len(prompt_ids) for prompt_ids in prompts)
    base = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
    }
    wants_logprobs = body.logprobs is not None
    timeout = state.settings.request_timeout
    echoes = [echo_text(state.tokenizer, text, ids) for text, ids in zip(texts, prompts, strict=True)]

    def completion_usage(outputs: list[RequestOutput]) -> dict:
        return usage(prompt_tokens, outputs if generates else [])

    def choice(index: int, output: RequestOutput, first: bool = True, offset: int = 0) -> dict:
        """One choice's text and logprobs; with echo, its first output begins with its prompt (and the prompt's
        scores come with that output)."""
        if not generates and output.finish_reason is not FinishReason.ERROR:
            # the token drawn does not end it (an EOS), but an abort stays one: the prompt was not scored
            reason = FinishReason.LENGTH if output.finish_reason is FinishReason.STOP else output.finish_reason
            output = replace(output, text="", logprobs=[], finish_reason=reason)
        text = output.text
        logprobs = completion_logprobs(state.token_texts, output.logprobs, offset) if wants_logprobs else None
        if body.echo and first:
            text = echoes[index // body.n] + text
            if wants_logprobs and output.prompt_logprobs is not None:
                prompt_ids = prompts[index // body.n]
                prompt_part = echoed_logprobs(state.token_texts, prompt_ids, output.prompt_logprobs, body.logprobs)
                logprobs = joined_logprobs(prompt_part, state.token_texts, output.logprobs)
        part = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(output)}
        if body.prompt_logprobs is not None:  # never streamed: the whole output is at hand
            part["prompt_logprobs"] = vllm_prompt_logprobs(state.token_texts, output, body.prompt_logprobs)
        return part

    if body.stream:
        offsets = [0] * len(runs)
        started: set[int] = set()

        def chunk(index: int, output: RequestOutput) -> dict:
            part = choice(index, output, index not in started, offsets[index])
            started.add(index)
            # the next tokens' offsets go on from these tokens', as in the whole answer: an echoed prompt's
            # tokens need not spell its text (a BOS token is not in a text prompt)
            if part["logprobs"] and part["logprobs"]["tokens"]:
                offsets[index] = offset_after(part["logprobs"])
            return part

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = openai_events(runs, timeout, chunk, include_usage, base, completion_usage)
        return sse.EventStream(events, lambda: close_all(runs))

    outputs = await asyncio.gather(*(collect(request, running, timeout) for running in runs))
    choices = [choice(i, output) for i, output in enumerate(outputs)]
    return {**base, "choices": choices, "usage": completion_usage(list(outputs))}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State):
    """OpenAI chat completions with the tokenizer's chat template; `model` picks the adapter; with tools, the output
    is read as calls (tool_call_reader)."""
    check_supported(body)
    check_choices(state, 1, body.n)
    new_reader = tool_call_reader(body, state.settings.tool_call_parser)
    prompt_ids = await tokenize_chat(state, body.messages, body)
    max_new_tokens = body.max_new_tokens(default=max(1, state.max_model_len - len(prompt_ids)))
    sampling = body.sampling(max_new_tokens, body.logprob_count(), body.prompt_logprobs)
    if new_reader is not None and new_reader.func.keeps_special_tokens:  # a parser reads the tags they may be
        sampling = replace(sampling, skip_special_tokens=False)
    runs = await start_choices(state, [prompt_ids], body, sampling)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    timeout = state.settings.request_timeout
    readers = [new_reader() for _ in runs] if new_reader is not None else None

    def logprobs_of(output: RequestOutput) -> dict | None:
        return chat_logprobs(state.token_texts, output.logprobs) if body.logprobs else None

    if body.stream:
        started: set[int] = set()

        def chunk(index: int, output: RequestOutput) -> dict | None:
            reason = finish_reason(output)
            if readers is None:
                delta = {"content": output.text}
            else:
                content, deltas = readers[index].read(output.text, final=reason is not None)
                reason = readers[index].finish_reason(reason)
                delta = ({"content": content} if content else {}) | ({"tool_calls": deltas} if deltas else {})
            if index not in started:
                started.add(index)
                delta = {"role": "assistant", "content": "", **delta}
            elif not delta and reason is None and not body.logprobs:
                return None  # nothing to send yet: a call not complete, or text that may begin one (as vLLM)
            return {"index": index, "delta": delta, "logprobs": logprobs_of(output), "finish_reason": reason}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_base = {**base, "object": "chat.completion.chunk"}
        events = openai_events(runs, timeout, chunk, include_usage, chunk_base, partial(usage, len(prompt_ids)))
        return sse.EventStream(events, lambda: close_all(runs))

    outputs = await asyncio.gather(*(collect(request, running, timeout) for running in runs))

    def choice(index: int, output: RequestOutput) -> dict:
        message, reason = {"role": "assistant", "content": output.text}, finish_reason(output)
        if readers is not None:
            readers[index].read(output.text, final=True)
            message, reason = readers[index].message(), readers[index].finish_reason(reason)
        return {"index": index, "message": message, "logprobs": logprobs_of(output), "finish_reason": reason}

    choices = [choice(i, output) for i, output in enumerate(outputs)]
    response = {**base, "object": "chat.completion", "choices": choices, "usage": usage(len(prompt_ids), list(outputs))}
    if body.prompt_logprobs is not None:  # the chat's one prompt, as vLLM reports it: beside the choices
        response["prompt_logprobs"] = vllm_prompt_logprobs(state.token_texts, outputs[0], body.prompt_logprobs)
    return response


@router.get("/v1/models")
async def models(state: State):
    """The base model and every adapter in the store, each usable as `model`: an adapter's `version` is
    the one it serves and `created` that version's publish time; `max_model_len` (vLLM's) is the context
    window every one of them is served with."""
    entry = {"object": "model", "owned_by": "reft-server", "max_model_len": state.max_model_len}
    data = [{**entry, "id": state.model_name, "created": int(time.time()), "root": state.model_name, "parent": None}]
    for name, version, facts in await asyncio.to_thread(state.registry.served_versions):
        adapter = {"id": name, "created": int(facts.created), "version": version}
        data.append({**entry, **adapter, "root": state.model_name, "parent": state.model_name})
    return {"object": "list", "data": data}
