"""vLLM's stop extras: `min_tokens` (no EOS or stop token drawn, no stop string matched, before that many
tokens), `include_stop_str_in_output` and `skip_special_tokens`, in the engine, the front end and over HTTP."""

import asyncio

import pytest

from server.engine.async_engine import AsyncEngine, GenerationRequest
from server.engine.core_loop import CoreThread
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import FinishReason
from server.engine.stop_strings import StopStringMatcher
from server.models.tiny import byte_level_tokenizer
from tests.engine_utils import make_core, prompt, run_core, seq


def greedy(model, prompt_ids, count=12) -> list[int]:
    return run_core(make_core(model), [(seq("g", prompt_ids, max_new_tokens=count), 0)])["g"]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_min_tokens_hold_eos_and_stop_tokens_back(models, async_scheduling):
    """EOS is the greedy first token and a stop token its third: with min_tokens 5 neither is drawn among
    the first 5 tokens (as the rest of the draws, greedy and seeded, stay what they would be)."""
    model = models[0]
    prompt_ids = prompt(20, 3)
    plain = greedy(model, prompt_ids)
    eos, stop = plain[0], plain[2]
    finished = {}
    core = make_core(model, eos={eos}, async_scheduling=async_scheduling)
    requests = [
        (seq("free", prompt_ids, stop_token_ids=(stop,)), 0),
        (seq("held", prompt_ids, stop_token_ids=(stop,), min_tokens=5), 0),
        (seq("sampled", prompt_ids, stop_token_ids=(stop,), min_tokens=5, temperature=1.0, seed=7), 0),
    ]
    out = run_core(core, requests, finished=finished)
    assert out["free"] == [eos] and finished["free"][0] is FinishReason.STOP
    for request_id in ("held", "sampled"):
        assert len(out[request_id]) >= 5 and not {eos, stop} & set(out[request_id][:5])
    again = run_core(make_core(model, eos={eos}), [(seq("held", prompt_ids, stop_token_ids=(stop,), min_tokens=5), 0)])
    assert again["held"] == out["held"]


@pytest.mark.parametrize(
    "deltas, allowed, include, shown, stopped",
    [
        (["ab", "cd", "ef"], [False, True, True], False, "abcdef", False),  # "ab" ends where it may not stop
        (["ab", "x", "ab"], [False, True, True], False, "abx", True),  # a later "ab" ends it
        (["x", "a", "b!"], [False, False, True], False, "x", True),  # begun early, ended late: it counts
        (["say STOP now"], [True], True, "say STOP", True),
    ],
)
def test_stop_strings_count_where_they_end_in_text_that_may_stop(deltas, allowed, include, shown, stopped):
    matcher = StopStringMatcher(("ab", "STOP") if not include else ("STOP",), include_in_output=include)
    out = "".join(matcher.feed(delta, may_stop) for delta, may_stop in zip(deltas, allowed, strict=True))
    out += matcher.finish()
    assert (out, matcher.stopped) == (shown, stopped)


def test_the_front_end_keeps_stop_strings_and_special_tokens_where_asked(models):
    """A stop string in the first min_tokens tokens' text does not end the request; included, it stays in
    the text; special tokens show where skip_special_tokens is off."""
    model = models[0]
    tokenizer = byte_level_tokenizer()
    prompt_ids = prompt(30, 2)
    plain = greedy(model, prompt_ids, 30)
    text = tokenizer.decode(plain, skip_special_tokens=True)
    stop = text[3:5]

    async def serve(**sampling):
        engine = AsyncEngine(CoreThread(make_core(model)), tokenizer)
        engine.start()
        try:
            params = SamplingParams(**{"max_new_tokens": 30, "stop": (stop,), **sampling})
            return await engine.submit(GenerationRequest(prompt_ids, params)).collect()
        finally:
            await engine.stop()

    cut = asyncio.run(serve())
    assert cut.text == text[: text.find(stop)] and cut.finish_reason is FinishReason.STOP
    included = asyncio.run(serve(include_stop_str_in_output=True))
    assert included.text == text[: text.find(stop) + len(stop)]
    first = text[:1]  # in the first token's text: ends the request at once, unless it comes too soon
    assert asyncio.run(serve(stop=(first,))).text == ""
    held = asyncio.run(serve(stop=(first,), min_tokens=30))
    assert held.text == text and held.finish_reason is FinishReason.LENGTH
    forced = {"stop": (), "max_new_tokens": 3, "logit_bias": ((2, 100.0),), "ignore_eos": True}  # EOS thrice
    assert asyncio.run(serve(**forced)).text == ""
    shown = asyncio.run(serve(**forced, skip_special_tokens=False)).text
    assert shown == tokenizer.decode([2, 2, 2], skip_special_tokens=False) != ""


def test_min_tokens_over_http(tmp_path, tiny_model_dir):
    from tests.api_utils import running_app

    with running_app(tiny_model_dir("llama"), tmp_path) as client:
        body = {"prompt": "hi", "max_new_tokens": 4, "min_tokens": 4}
        assert client.post("/v1/generate", json=body).status_code == 200
        refused = client.post("/v1/generate", json={**body, "min_tokens": 5})
        assert refused.status_code == 400 and "min_tokens" in refused.text
        model = client.get("/v1/models").json()["data"][0]["id"]
        chat = {"model": model, "prompt": "hi", "max_tokens": 3, "min_tokens": 2, "include_stop_str_in_output": True}
        assert client.post("/v1/completions", json=chat).status_code == 200


def test_include_stop_str_in_output_renders_the_stop_token_too(models):
    """As vLLM's: a request that a stop token (or EOS) ends keeps that token's text where
    include_stop_str_in_output asks for the stop in the output; without it, the token is reported, not rendered."""
    model = models[0]
    tokenizer = byte_level_tokenizer()
    prompt_ids = prompt(30, 2)
    plain = greedy(model, prompt_ids, 30)
    stop = next(t for t in plain[1:] if tokenizer.decode([t]).isprintable())  # a character of its own
    end = plain.index(stop) + 1

    async def serve(**sampling):
        engine = AsyncEngine(CoreThread(make_core(model)), tokenizer)
        engine.start()
        try:
            params = SamplingParams(max_new_tokens=30, stop_token_ids=(stop,), **sampling)
            return await engine.submit(GenerationRequest(prompt_ids, params)).collect()
        finally:
            await engine.stop()

    cut = asyncio.run(serve())
    assert cut.token_ids == plain[:end] and cut.text == tokenizer.decode(plain[: end - 1])
    kept = asyncio.run(serve(include_stop_str_in_output=True))
    assert kept.token_ids == plain[:end] and kept.finish_reason is FinishReason.STOP
    assert kept.text == tokenizer.decode(plain[:end])
