"""The engine host failing or stalling around the HTTP front end: liveness, requests racing its end, shutdown
with a stuck engine, and a start that fails once the engine process runs (found by a review of that boundary)."""

import asyncio
import multiprocessing
import threading

import pytest

from server.adapters.store import StoreError
from server.api import health
from server.engine import async_engine
from server.engine.async_engine import AsyncEngine, GenerationRequest
from server.engine.core_loop import STOP, CoreThread
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import FinishReason
from server.models.tiny import byte_level_tokenizer
from tests.api_utils import error_of, running_app, wait_for
from tests.engine_utils import load_engine_model, make_core, prompt


@pytest.fixture
def client(tiny_model_dir, tmp_path):
    with running_app(tiny_model_dir("llama"), tmp_path) as client:
        yield client


def test_health_fails_when_the_engine_is_stuck_while_idle(client, monkeypatch):
    """An idle loop still reports every IDLE_WAIT_SECONDS: a minute without a report means it is wedged
    (a tensor-parallel idle ping that never returns, say). /ready says so; /health must too, or an
    orchestrator keeps a replica that gets no traffic (unready) and so never becomes busy, forever."""
    core = client.app.state.reft.engine.host.core
    release = threading.Event()
    monkeypatch.setattr(core, "idle", lambda: release.wait(30))
    monkeypatch.setattr(health, "STALE_ENGINE_SECONDS", 0.3)
    try:
        wait_for(lambda: client.get("/ready").status_code == 503, timeout=5)
        response = client.get("/health")
        assert response.status_code == 503 and "has not reported" in error_of(response)["message"]
    finally:
        release.set()


def test_a_request_submitted_as_the_engine_thread_ends_is_failed_not_left_hanging(tiny_model_dir, monkeypatch):
    """The thread's last report fails what is in flight; a request the event loop was submitting at that
    moment (it passed the `accepting` check, its stream not registered yet) must fail too."""
    model = load_engine_model(tiny_model_dir("llama"))

    async def body():
        engine = AsyncEngine(CoreThread(make_core(model)), byte_level_tokenizer())
        engine.start()

        class EndingTheHostMeanwhile(async_engine.RequestStream):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                engine.host.send(STOP)  # as a thread that dies: its last report comes now
                engine.host.join(5)

        monkeypatch.setattr(async_engine, "RequestStream", EndingTheHostMeanwhile)
        stream = engine.submit(GenerationRequest(prompt(10, 1), SamplingParams(max_new_tokens=4)))
        try:
            return await asyncio.wait_for(stream.collect(), 5)
        finally:
            await engine.stop()

    assert asyncio.run(body()).finish_reason is FinishReason.ERROR


def test_cancel_all_ends_every_stream_even_while_the_engine_is_stuck(tiny_model_dir):
    """At the end of the shutdown grace the server aborts what still runs, so that each stream ends with
    an abort event and [DONE] before the connections are cut. An engine stuck in a step (the case a
    shutdown must get past) cannot answer the aborts: the streams must end all the same."""
    model = load_engine_model(tiny_model_dir("llama"))
    core = make_core(model)
    release = threading.Event()

    async def body():
        engine = AsyncEngine(CoreThread(core), byte_level_tokenizer())
        engine.start()
        stream = engine.submit(GenerationRequest(prompt(10, 1), SamplingParams(max_new_tokens=400, ignore_eos=True)))
        first = await anext(stream)
        real_step = core.step
        core.step = lambda: release.wait(30) and real_step()
        await asyncio.sleep(0.2)  # the loop is in the stuck step now
        engine.cancel_all()
        try:
            rest = await asyncio.wait_for(stream.collect(), 2)
        finally:
            release.set()
            await engine.stop()
        return first, rest

    first, rest = asyncio.run(body())
    assert first.token_ids and rest.finish_reason is FinishReason.ABORT


def test_a_start_that_fails_once_the_engine_process_runs_stops_that_process(tiny_model_dir, tmp_path):
    """The engine process (the model, on a GPU its memory) must not outlive a start that failed after it
    was spawned: here the store cannot be opened (a file is in its way)."""
    in_the_way = tmp_path / "store"
    in_the_way.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open the store"):
        with running_app(tiny_model_dir("llama"), in_the_way, engine_core="process", device="cpu"):
            pass
    wait_for(lambda: not multiprocessing.active_children(), timeout=10)
