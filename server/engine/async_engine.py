"""The async front end the HTTP layer uses: `submit()` a request, iterate its stream of incremental
outputs, `cancel()` it. The engine core steps in a thread of its own, so the event loop never waits
on the model; outputs come back once per step through `call_soon_threadsafe`.

Detokenization and stop strings live here, on the event loop side, as in vLLM's front end: the
model thread only handles token ids, and a stop string cancels its request in the core.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.engine.core import EngineCore, EngineLoad, SeqOutput
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.sampler import Sample
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import FinishReason, Sequence
from server.engine.stop_strings import StopStringMatcher
from server.metrics import BASE_LABEL, Metrics
from server.reft.adapter import Adapter
from server.reft.request_edit import request_edit

log = logging.getLogger(__name__)
IDLE_WAIT_SECONDS = 0.5


class EngineOverloaded(RuntimeError):
    """The bounded queue is full: the caller should retry later (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or its thread died (HTTP 503)."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: Adapter | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class RequestOutput:
    """One increment of a request's stream; the last one has `finished` set."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[Sample]
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RequestStream:
    """Async iterator over one request's outputs. Cancel it (or leave its `async for` early and call
    `cancel()`) to free its KV blocks at the next step.

    The engine feeds it with `put`; it calls back `abort(request_id)` when a stop string ends the
    request early or the consumer cancels, and `on_finished(stream, reason)` once, at its end."""

    def __init__(
        self,
        request: GenerationRequest,
        tokenizer,
        *,
        abort: Callable[[str], None],
        on_finished: Callable[[RequestStream, FinishReason], None],
        metrics: Metrics | None = None,
    ):
        self.request = request
        self.request_id = request.request_id
        self.label = request.adapter.name if request.adapter is not None else BASE_LABEL  # for metrics
        self._abort = abort
        self._on_finished = on_finished
        self._metrics = metrics
        self._queue: asyncio.Queue[SeqOutput] = asyncio.Queue()
        self._detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self._stops = StopStringMatcher(request.sampling.stop)
        self.num_generated = 0
        self.finished = False  # the consumer has seen the last output
        self._ended = False  # on_finished was called
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def put(self, output: SeqOutput) -> None:
        """On the event loop: one step's output for this request."""
        self._queue.put_nowait(output)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        raw = await self._queue.get()
        while not raw.finish_reason and self._queue.qsize():  # coalesce what piled up meanwhile
            raw = _merge(raw, self._queue.get_nowait())
        return self._process(raw)

    def _process(self, raw: SeqOutput) -> RequestOutput:
        self._record_timing(len(raw.new_tokens))
        self.num_generated = raw.num_generated or self.num_generated
        text = self._stops.feed(self._detokenizer.push(raw.new_tokens))
        reason = raw.finish_reason
        if self._stops.stopped and reason is None:
            reason = FinishReason.STOP
            self._abort(self.request_id)
        if reason is not None:
            if not self._stops.stopped:
                text += self._stops.feed(self._detokenizer.flush()) + self._stops.finish()
            self.finished = True
            self._end(reason)
        return RequestOutput(
            self.request_id,
            text,
            raw.new_tokens,
            raw.samples,
            finished=self.finished,
            finish_reason=reason,
            error=raw.error,
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=self.num_generated,
        )

    def _record_timing(self, new_tokens: int) -> None:
        if not new_tokens:
            return
        now = time.monotonic()
        metrics = self._metrics
        if self.first_token_at is None:
            self.first_token_at = now
            if metrics:
                metrics.ttft.observe(now - self.submitted_at)
        elif metrics and self.last_token_at is not None:
            metrics.itl.observe((now - self.last_token_at) / new_tokens)
        self.last_token_at = now

    def cancel(self) -> None:
        """The consumer gives up: abort in the engine and end this stream with an ABORT output."""
        if self.finished or self._ended:
            return
        self._abort(self.request_id)
        self._end(FinishReason.ABORT)
        self.put(SeqOutput(self.request_id, finish_reason=FinishReason.ABORT))

    def _end(self, reason: FinishReason) -> None:
        if not self._ended:
            self._ended = True
            self._on_finished(self, reason)

    async def collect(self) -> RequestOutput:
        """Run to completion; one RequestOutput holding the whole text, tokens and logprobs."""
        parts: list[RequestOutput] = [out async for out in self]
        last = parts[-1]
        return RequestOutput(
            self.request_id,
            "".join(p.text for p in parts),
            [t for p in parts for t in p.token_ids],
            [s for p in parts for s in p.logprobs],
            True,
            last.finish_reason,
            last.error,
            last.prompt_tokens,
            last.completion_tokens,
        )


def _merge(first: SeqOutput, second: SeqOutput) -> SeqOutput:
    second.new_tokens = first.new_tokens + second.new_tokens
    second.samples = first.samples + second.samples
    return second


class AsyncEngine:
    def __init__(self, core: EngineCore, tokenizer, *, max_queue: int = 256, metrics: Metrics | None = None):
        self.core = core
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_in_flight = core.max_num_seqs + max_queue
        self._streams: dict[str, RequestStream] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = False
        self.last_heartbeat = 0.0
        self.steps = 0
        self._reported = core.load()  # counters already turned into metrics

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="reft-engine", daemon=True)
        self._accepting = True
        self.last_heartbeat = time.monotonic()
        self._thread.start()

    async def stop(self, grace_seconds: float = 0.0) -> None:
        """Stop accepting; let running requests finish for up to `grace_seconds`; abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_seconds
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self.cancel(request_id)
        while self._streams and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.02)
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def busy(self) -> bool:
        """Whether the core has requests to step (a heartbeat older than a step then means it is stuck)."""
        return self.core.has_work()

    def problem(self) -> str | None:
        return self.core.problem()

    def load(self) -> EngineLoad:
        """The core's counters, read from the event loop: a step may be changing them, which is fine
        for gauges and probes."""
        return self.core.load()

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; raises EngineOverloaded when the bounded queue is full."""
        if not self.accepting:
            raise EngineStopped("the engine is not accepting requests")
        if len(self._streams) >= self.max_in_flight:
            raise EngineOverloaded(f"{len(self._streams)} requests in flight; the limit is {self.max_in_flight}")
        request.sampling.check()
        stream = RequestStream(
            request, self.tokenizer, abort=self.cancel, on_finished=self._stream_finished, metrics=self.metrics
        )
        self._streams[request.request_id] = stream
        edit = request_edit(request.adapter, len(request.prompt_ids))
        seq = Sequence(request.request_id, list(request.prompt_ids), request.sampling, edit)
        self._inbox.put(("add", seq))
        self._wakeup.set()
        return stream

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def _stream_finished(self, stream: RequestStream, reason: FinishReason) -> None:
        self._streams.pop(stream.request_id, None)
        if self.metrics:
            self.metrics.requests.labels(stream.label, reason.value).inc()
            self.metrics.prompt_tokens.labels(stream.label).inc(len(stream.request.prompt_ids))
            self.metrics.generation_tokens.labels(stream.label).inc(stream.num_generated)
            self.metrics.e2e.observe(time.monotonic() - stream.submitted_at)

    def _deliver(self, outputs: list[SeqOutput]) -> None:
        """On the event loop: route each output to its stream."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output)

    # -- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            outputs = self._drain_inbox()
            if self.core.has_work():
                try:
                    outputs.extend(self.core.step())
                except Exception:  # the core contains per-request failures; this is a bug: keep going
                    log.exception("unexpected engine error")
                self.steps += 1
                self._observe_step()
            elif outputs:  # the last requests were cancelled or refused: the load gauges must say so
                self._observe_load()
            else:
                self.core.idle()
                self._wakeup.wait(IDLE_WAIT_SECONDS)
            self.last_heartbeat = time.monotonic()
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _drain_inbox(self) -> list[SeqOutput]:
        outputs = []
        while True:
            try:
                command, payload = self._inbox.get_nowait()
            except queue.Empty:
                return outputs
            if command == "add":
                try:
                    self.core.add(payload)
                except ValueError as e:
                    outputs.append(SeqOutput(payload.request_id, finish_reason=FinishReason.ERROR, error=str(e)))
            elif command == "abort":
                aborted = self.core.abort(payload)
                if aborted is not None:
                    outputs.append(aborted)

    def _observe_load(self) -> EngineLoad | None:
        if self.metrics is None:
            return None
        load = self.core.load()
        self.metrics.observe_load(
            waiting=load.waiting,
            running=load.running,
            kv_usage=load.kv_usage,
            kv_blocks=load.kv_blocks,
            block_size=load.block_size,
        )
        self.metrics.observe_adapters(load.running_adapters, load.waiting_adapters)
        return load

    def _observe_step(self) -> None:
        load = self._observe_load()
        if load is None:
            return
        m, reported = self.metrics, self._reported
        m.preemptions.inc(load.preemptions - reported.preemptions)
        m.prefix_queries.inc(load.prefix_queries - reported.prefix_queries)
        m.prefix_hits.inc(load.prefix_hits - reported.prefix_hits)
        self._reported = load
        if self.core.last_step is not None:
            m.step_tokens.observe(self.core.last_step.num_tokens)
            m.step_requests.observe(self.core.last_step.num_seqs)
            m.step_seconds.observe(self.core.last_step.seconds)
