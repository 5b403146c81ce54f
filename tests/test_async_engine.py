"""The async front end: streams, detokenization, stop strings, cancellation and overload."""

import asyncio
import random
import time

import pytest

from server.engine.async_engine import AsyncEngine, EngineOverloaded, EngineStopped, GenerationRequest
from server.engine.core_loop import MAX_STEP_FAILURES, CoreThread
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import FinishReason
from server.engine.stop_strings import StopStringMatcher
from server.models.tiny import byte_level_tokenizer
from tests.engine_utils import load_engine_model, make_core, prompt, run_core, seq


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_engine_model(tiny_model_dir("llama"))


def run(coro):
    return asyncio.run(coro)


async def with_engine(model, body, max_queue=256, **config):
    engine = AsyncEngine(CoreThread(make_core(model, **config)), byte_level_tokenizer(), max_queue=max_queue)
    engine.start()
    try:
        return await body(engine)
    finally:
        await engine.stop()


def test_detokenizer_never_splits_multibyte_characters():
    tokenizer = byte_level_tokenizer()
    text = "héllo ✓ 日本語 🎉 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    detokenizer = IncrementalDetokenizer(tokenizer, [1, 72, 73])
    deltas = [detokenizer.push([token]) for token in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detokenizer.flush() == text


def test_detokenizer_flushes_an_incomplete_character_at_the_end():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer("✓", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer, [1])
    assert detokenizer.push(ids[:2]) == ""
    assert detokenizer.flush() == "\ufffd"


@pytest.mark.parametrize(
    "deltas, stops, shown, stopped",
    [
        (["hello wor", "ld and more"], ("world",), "hello ", True),
        (["ab", "c", "d"], ("cd",), "ab", True),
        (["a STO", "P b"], ("STOP",), "a ", True),
        (["a ST", "ring"], ("STOP",), "a STring", False),
        (["xyz"], (), "xyz", False),
        (["one", "two"], ("w", "ne"), "o", True),
    ],
)
def test_stop_string_matcher(deltas, stops, shown, stopped):
    matcher = StopStringMatcher(stops)
    out = "".join(matcher.feed(d) for d in deltas)
    out += matcher.finish()
    assert (out, matcher.stopped) == (shown, stopped)


def reference_stop(text: str, stops: tuple[str, ...], include: bool) -> tuple[str, bool]:
    """What stop strings leave of a whole text fed a character at a time: the text up to where the first of them
    ends, the longest of those ending there cut off (or kept)."""
    found = [(i + len(s), -len(s)) for s in stops if (i := text.find(s)) >= 0]
    if not found:
        return text, False
    end, minus_length = min(found)
    return text[: end if include else end + minus_length], True


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_matcher_agrees_with_the_whole_text(include):
    """Long texts fed a character at a time (as a token's text may be), the matcher forgetting what no stop string
    can reach back to."""
    rng = random.Random(include)
    for _ in range(300):
        stops = tuple({"".join(rng.choice("ab ") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))})
        text = "".join(rng.choice("ab  c") for _ in range(rng.randint(0, 200)))
        matcher = StopStringMatcher(stops, include_in_output=include)
        shown = "".join(matcher.feed(char) for char in text) + matcher.finish()
        assert (shown, matcher.stopped) == reference_stop(text, stops, include), (text, stops)


def test_stop_string_matcher_reads_a_long_output_in_linear_time():
    """It was quadratic: 200k pieces took 11 s on the event loop; the shown text's head is forgotten now."""
    matcher, started = StopStringMatcher(("</answer>", "\n\nUser:")), time.perf_counter()
    shown = "".join(matcher.feed("wo ") for _ in range(200_000))
    assert time.perf_counter() - started < 5 and shown == "wo " * 200_000 and len(matcher.pending) < 40


def test_stream_matches_the_core_and_decodes_text(model):
    p = prompt(40, 1)
    expected = run_core(make_core(model), [(seq("x", p, max_new_tokens=20), 0)])["x"]

    async def body(engine):
        stream = engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=20)))
        parts = [out async for out in stream]
        return parts

    parts = run(with_engine(model, body))
    assert [t for part in parts for t in part.token_ids] == expected
    assert "".join(part.text for part in parts) == byte_level_tokenizer().decode(expected)
    assert parts[-1].finished and parts[-1].finish_reason is FinishReason.LENGTH
    assert parts[-1].completion_tokens == 20 and parts[-1].prompt_tokens == 40


def test_stop_string_ends_the_request_and_frees_its_blocks(model):
    tokenizer = byte_level_tokenizer()
    p = prompt(30, 2)
    full = run_core(make_core(model), [(seq("x", p, max_new_tokens=30), 0)])["x"]
    text = tokenizer.decode(full)
    stop = text[10:13]
    assert stop and text.find(stop) >= 1

    async def body(engine):
        result = await engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=30, stop=(stop,)))).collect()
        await asyncio.sleep(0.1)
        return result, engine.host.core.kv.num_free_blocks, engine.host.core.kv.num_blocks, engine.num_in_flight

    result, free, total, in_flight = run(with_engine(model, body))
    assert result.text == text[: text.find(stop)]
    assert result.finish_reason is FinishReason.STOP
    assert free == total and in_flight == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_thousand_requests_with_random_cancellations_leak_no_blocks(model, async_scheduling):
    rng = random.Random(0)

    async def one(engine, i):
        params = SamplingParams(max_new_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 1.0]), seed=i)
        stream = engine.submit(GenerationRequest(prompt(rng.randint(1, 60), i), params))
        cancel_after = rng.choice([0, 1, 3, None, None])
        if cancel_after == 0:
            stream.cancel()
        outputs = []
        async for out in stream:
            outputs.append(out)
            if cancel_after is not None and len(outputs) >= cancel_after:
                stream.cancel()
                break
        return outputs[-1].finish_reason

    async def body(engine):
        reasons = []
        for batch in range(10):
            reasons += await asyncio.gather(*(one(engine, batch * 100 + i) for i in range(100)))
        for _ in range(100):  # cancellations land at the next step
            if engine.host.core.kv.num_free_blocks == engine.host.core.kv.num_blocks and not engine.host.core.sequences:
                break
            await asyncio.sleep(0.02)
        core = engine.host.core
        return reasons, core.kv.num_free_blocks, core.kv.num_blocks, len(core.sequences)

    config = dict(num_blocks=96, max_num_seqs=32, max_model_len=256, async_scheduling=async_scheduling)
    reasons, free, total, remaining = run(with_engine(model, body, **config))
    assert len(reasons) == 1000
    assert free == total and remaining == 0
    assert FinishReason.ABORT in reasons and FinishReason.LENGTH in reasons


def test_overload_is_refused_not_queued_without_bound(model):
    async def body(engine):
        streams = [engine.submit(GenerationRequest(prompt(10, i), SamplingParams(max_new_tokens=50))) for i in range(6)]
        with pytest.raises(EngineOverloaded):
            engine.submit(GenerationRequest(prompt(10, 99)))
        for stream in streams:
            stream.cancel()
        return [await s.collect() for s in streams]

    results = run(with_engine(model, body, max_queue=2, max_num_seqs=4))
    assert all(r.finished for r in results)


def test_graceful_stop_drains_running_requests(model):
    async def body():
        engine = AsyncEngine(CoreThread(make_core(model)), byte_level_tokenizer())
        engine.start()
        stream = engine.submit(GenerationRequest(prompt(10, 1), SamplingParams(max_new_tokens=40)))
        collecting = asyncio.create_task(stream.collect())
        await asyncio.sleep(0.01)
        await engine.stop(grace_seconds=30)
        with pytest.raises(EngineStopped):
            engine.submit(GenerationRequest(prompt(10, 2)))
        return await collecting

    result = run(body())
    assert result.finish_reason is FinishReason.LENGTH and result.completion_tokens == 40


def test_stop_after_grace_aborts_the_rest(model):
    async def body():
        engine = AsyncEngine(CoreThread(make_core(model)), byte_level_tokenizer())
        engine.start()
        stream = engine.submit(GenerationRequest(prompt(10, 1), SamplingParams(max_new_tokens=400, ignore_eos=True)))
        collecting = asyncio.create_task(stream.collect())
        await asyncio.sleep(0.05)
        await engine.stop(grace_seconds=0)
        return await collecting

    assert run(body()).finish_reason is FinishReason.ABORT


def step_replaced_mid_request(model, step):
    """Serve a long request, replace the core's step with `step` once it runs, and return how the request
    ended and the engine."""

    async def body():
        core = make_core(model)
        engine = AsyncEngine(CoreThread(core), byte_level_tokenizer())
        engine.start()
        stream = engine.submit(GenerationRequest(prompt(10, 1), SamplingParams(max_new_tokens=400, ignore_eos=True)))
        await asyncio.sleep(0.05)
        core.step = step
        return await asyncio.wait_for(stream.collect(), 10), engine

    return run(body())


def test_an_engine_thread_that_dies_fails_what_is_in_flight(model):
    def die():
        raise KeyboardInterrupt  # no Exception: nothing in the loop contains it

    result, engine = step_replaced_mid_request(model, die)
    assert result.finish_reason is FinishReason.ERROR and "engine thread died" in result.error
    assert not engine.alive and "KeyboardInterrupt" in engine.problem()


def test_steps_that_keep_raising_end_the_engine_instead_of_spinning(model):
    """One step that raises is logged and stepped again; steps that keep raising cannot make progress:
    the loop gives up, so requests in flight fail at once and the probes say why (a spinning loop
    kept its heartbeat fresh while every request hung)."""
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("a step that cannot succeed")

    result, engine = step_replaced_mid_request(model, broken)
    assert result.finish_reason is FinishReason.ERROR and "a step that cannot succeed" in result.error
    assert len(calls) == MAX_STEP_FAILURES and not engine.alive


def test_what_piles_up_reaches_the_consumer_as_one_output_and_a_cancel_drops_it():
    """A consumer that was away gets every token and logprob that piled up, in order, in one output; a
    stream given up drops what it never delivered."""
    from server.engine.async_engine import RequestStream
    from server.engine.core import SeqOutput
    from server.engine.sampler import Sample

    aborted = []
    request = GenerationRequest([5, 6], SamplingParams(max_new_tokens=100, logprobs=1))
    stream = RequestStream(request, byte_level_tokenizer(), abort=aborted.append, on_finished=lambda *_: None)
    for token in range(70, 80):
        stream.put(SeqOutput(stream.request_id, new_tokens=[token], samples=[Sample(token, -1.0, [(token, -1.0)])]))

    async def read(count):
        return [await anext(stream) for _ in range(count)]

    (piled,) = run(read(1))
    assert piled.token_ids == list(range(70, 80)) and [s.token for s in piled.logprobs] == piled.token_ids
    stream.put(SeqOutput(stream.request_id, new_tokens=[80]))
    stream.cancel()
    (last,) = run(read(1))
    assert last.token_ids == [] and last.finish_reason is FinishReason.ABORT and aborted == [stream.request_id]


def test_a_failing_command_fails_its_request_alone(model, monkeypatch):
    import server.engine.core_loop as core_loop

    real = core_loop.request_edit

    def broken_for_one(adapter, prompt_len):
        if prompt_len == 13:
            raise RuntimeError("broken edit")
        return real(adapter, prompt_len)

    monkeypatch.setattr(core_loop, "request_edit", broken_for_one)

    async def body(engine):
        broken = engine.submit(GenerationRequest(prompt(13, 1), SamplingParams(max_new_tokens=4)))
        fine = engine.submit(GenerationRequest(prompt(10, 2), SamplingParams(max_new_tokens=4)))
        return await broken.collect(), await fine.collect()

    broken, fine = run(with_engine(model, body))
    assert broken.finish_reason is FinishReason.ERROR and "broken edit" in broken.error
    assert fine.finish_reason is FinishReason.LENGTH and fine.completion_tokens == 4
