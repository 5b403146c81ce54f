"""The native generation route: POST /v1/generate (JSON, or server-sent events with stream=true)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from server.api import sse
from server.api.deps import AppState, State, require_api_key
from server.api.errors import APIError, error_body
from server.api.schemas import AdapterRef, GenerateRequest, GenerateResponse, TokenLogprob, Usage
from server.api.service import (
    Running,
    collect,
    compile_grammar,
    generation_failed,
    start,
    stream_outputs,
    tokenize,
)
from server.api.token_texts import TokenTexts
from server.engine.async_engine import RequestOutput
from server.engine.sampler import Sample
from server.engine.sequence import FinishReason

router = APIRouter(tags=["generation"], dependencies=[Depends(require_api_key)])


def token_logprobs(texts: TokenTexts, samples: list[Sample]) -> list[TokenLogprob]:
    def entry(token_id: int, logprob: float) -> dict:
        return {"token_id": token_id, "token": texts(token_id), "logprob": logprob}

    return [
        TokenLogprob(
            **entry(s.token, s.logprob), rank=s.rank, top_logprobs=[entry(t, lp) for t, lp in s.top_logprobs or []]
        )
        for s in samples
        if s.logprob is not None
    ]


def prompt_token_logprobs(texts: TokenTexts, samples: list[Sample]) -> list[TokenLogprob | None]:
    """The prompt's tokens scored: the first has nothing before it to be scored by (null), as in vLLM."""
    return [None, *token_logprobs(texts, samples)]


def adapter_ref(running: Running) -> AdapterRef | None:
    if running.lease is None:
        return None
    return AdapterRef(name=running.lease.adapter.name, version=running.lease.adapter.version)


def usage(output: RequestOutput) -> Usage:
    return Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
    )


def failure(output: RequestOutput) -> APIError | None:
    if output.finish_reason is FinishReason.ERROR:
        return generation_failed(output)
    return None


@router.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_none=True)
async def generate(body: GenerateRequest, request: Request, state: State):
    """Generate from a prompt with the base model or an adapter (`adapter`: name or name@version)."""
    field = "prompt" if body.prompt is not None else "input_ids"
    prompt_ids = await tokenize(state, body.prompt if body.prompt is not None else body.input_ids, field)
    sampling = body.sampling(body.max_new_tokens, body.logprobs, body.prompt_logprobs)
    compiled = await compile_grammar(state, sampling.grammar, body.structure_field())
    running = await start(state, prompt_ids, sampling, body.adapter, "adapter", "max_new_tokens", compiled)
    adapter = adapter_ref(running)
    timeout = state.settings.request_timeout
    if body.stream:
        return sse.EventStream(_events(state, running, adapter, body.logprobs is not None, timeout), running.close)
    output = await collect(request, running, timeout)
    if error := failure(output):
        raise error
    scored = output.prompt_logprobs
    return GenerateResponse(
        id=running.stream.request_id,
        text=output.text,
        token_ids=output.token_ids,
        finish_reason=output.finish_reason.value if output.finish_reason else None,
        adapter=adapter,
        usage=usage(output),
        logprobs=token_logprobs(state.token_texts, output.logprobs) if body.logprobs is not None else None,
        prompt_logprobs=prompt_token_logprobs(state.token_texts, scored) if scored is not None else None,
    )


async def _events(
    state: AppState, running: Running, adapter: AdapterRef | None, logprobs: bool, timeout: float
) -> AsyncIterator[str]:
    request_id = running.stream.request_id
    try:
        async for output in stream_outputs(running, timeout):
            if error := failure(output):
                yield sse.event(error_body(error.status, error.message))
                break
            data = {"id": request_id, "text": output.text, "token_ids": output.token_ids, "finish_reason": None}
            if logprobs:
                data["logprobs"] = [lp.model_dump() for lp in token_logprobs(state.token_texts, output.logprobs)]
            if output.prompt_logprobs is not None:  # the first output's, where asked
                scored = prompt_token_logprobs(state.token_texts, output.prompt_logprobs)
                data["prompt_logprobs"] = [lp.model_dump() if lp else None for lp in scored]
            if output.finished:
                data["finish_reason"] = output.finish_reason.value
                data["usage"] = usage(output).model_dump()
                data["adapter"] = adapter.model_dump() if adapter else None
            yield sse.event(data)
    except TimeoutError:
        yield sse.event(error_body(504, f"the request did not finish within {timeout:g} s and was aborted"))
    yield sse.DONE
