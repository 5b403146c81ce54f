"""The async front end the HTTP layer uses: `submit()` a request, iterate its stream of incremental
outputs, `cancel()` it. The engine core steps elsewhere (in a thread: core_loop.py; or in a process of
its own: server/engine_process.py), so the event loop never waits on the model; outputs come back
once per step, with the step's report.

Detokenization and stop strings live here, on the event loop side, as in vLLM's front end: the
model thread only handles token ids, and a stop string cancels its request in the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace

from server.engine.core import EngineLoad, SeqOutput
from server.engine.core_loop import STOP, Abort, CoreHost, StepReport, Submit
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.sampler import Sample
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import FinishReason
from server.engine.step_profiler import ProfileSteps
from server.engine.stop_strings import StopStringMatcher
from server.metrics import BASE_LABEL, Metrics
from server.reft.adapter import Adapter


class EngineOverloaded(RuntimeError):
    """The bounded queue is full: the caller should retry later (HTTP 429)."""


class ProfileBusy(RuntimeError):
    """A profile of the engine's steps is being taken already."""


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
    unavailable: bool = False  # SeqOutput's: the engine stopped under it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[Sample] | None = None  # in the first output, where asked: prompt tokens 1.. scored


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
        sampling = request.sampling
        self._detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids, sampling.skip_special_tokens)
        self._stops = StopStringMatcher(sampling.stop, sampling.include_stop_str_in_output)
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
        if not raw.finish_reason and self._queue.qsize():  # coalesce what piled up meanwhile, in linear time
            tokens, samples, prompt = list(raw.new_tokens), list(raw.samples), raw.prompt_logprobs
            while not raw.finish_reason and self._queue.qsize():
                raw = self._queue.get_nowait()
                tokens += raw.new_tokens
                samples += raw.samples
                prompt = prompt if prompt is not None else raw.prompt_logprobs
            raw.new_tokens, raw.samples, raw.prompt_logprobs = tokens, samples, prompt
        return self._process(raw)

    def _process(self, raw: SeqOutput) -> RequestOutput:
        self._record_timing(len(raw.new_tokens))
        self.num_generated = raw.num_generated or self.num_generated
        # as vLLM's: the token that stops (EOS, or one of stop_token_ids) is reported, and rendered only where
        # include_stop_str_in_output asks for the stop in the text
        unrendered = raw.finish_reason is FinishReason.STOP and not self.request.sampling.include_stop_str_in_output
        text, kept = self._text_until_stop(raw.new_tokens, unrendered)
        tokens, samples = raw.new_tokens[:kept], raw.samples[:kept]
        self.num_generated -= len(raw.new_tokens) - kept
        reason = raw.finish_reason
        if reason is not None and not self._stops.stopped:
            may_stop = self.num_generated > self.request.sampling.min_tokens
            text += self._stops.feed(self._detokenizer.flush(), may_stop) + self._stops.finish()
        if self._stops.stopped and reason in (None, FinishReason.LENGTH):
            if reason is None:
                self._abort(self.request_id)
            reason = FinishReason.STOP  # as vLLM's: the stop string ended it, even on the last token allowed
        if reason is not None:
            self.finished = True
            self._end(reason)
        return RequestOutput(
            self.request_id,
            text,
            tokens,
            samples,
            finished=self.finished,
            finish_reason=reason,
            error=raw.error,
            unavailable=raw.unavailable,
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=self.num_generated,
            prompt_logprobs=raw.prompt_logprobs,
        )

    def _text_until_stop(self, tokens: list[int], last_unrendered: bool) -> tuple[str, int]:
        """The text `tokens` add (the last one left out if `last_unrendered`), and how many of them count:
        with stop strings, a token at a time, so that tokens past the one completing a stop string (steps
        coalesced while the consumer was busy) are neither reported nor counted, however fast it reads. As in
        vLLM, a stop string counts only in the text of tokens past the first min_tokens."""
        rendered = tokens[:-1] if last_unrendered else tokens
        if not self._stops.stops:
            return self._stops.feed(self._detokenizer.push(rendered)), len(tokens)
        text, before = "", self.num_generated - len(tokens)  # tokens generated before these
        for count, token in enumerate(rendered, 1):
            may_stop = before + count > self.request.sampling.min_tokens
            text += self._stops.feed(self._detokenizer.push([token]), may_stop)
            if self._stops.stopped:
                return text, count
        return text, len(tokens)

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
        while self._queue.qsize():  # undelivered outputs of a request given up: nobody will read them
            self._queue.get_nowait()
        self.end_now()

    def end_now(self) -> None:
        """The server gives up (a shutdown): abort in the engine and end this stream with an ABORT output
        after what it has received, without waiting for the engine, which may be stuck."""
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
        return replace(
            last,
            text="".join(p.text for p in parts),
            token_ids=[t for p in parts for t in p.token_ids],
            logprobs=[s for p in parts for s in p.logprobs],
            prompt_logprobs=next((p.prompt_logprobs for p in parts if p.prompt_logprobs is not None), None),
        )


class AsyncEngine:
    """The front end over an engine core that steps elsewhere: in a thread (`CoreThread`) or in a
    process of its own (`CoreProcess`). Either host hands every loop iteration's `StepReport` to
    `_on_report` (on the engine thread, or on the event loop): metrics are recorded there, and the
    outputs go to their streams on the event loop."""

    def __init__(self, host: CoreHost, tokenizer, *, max_queue: int = 256, metrics: Metrics | None = None):
        self.host = host
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_in_flight = host.max_num_seqs + max_queue
        self._streams: dict[str, RequestStream] = {}
        self._reserved = 0  # slots held by requests still being prepared (`reserving`)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._stopping = False
        self._host_ended = False  # its last report came: whatever its thread or process still shows
        self._accepting = False
        self._loop_thread: int | None = None
        self._load: EngineLoad = host.first_load
        self._reported: EngineLoad = host.first_load  # counters already turned into metrics
        self._profiles_sent = 0
        self._profiles_done = 0  # as the loop last reported
        self.last_heartbeat = 0.0
        if metrics is not None:  # the KV cache's shape from the start: the loop's first report may be 0.5 s off
            self._observe_load(host.first_load)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.last_heartbeat = time.monotonic()
        self.host.start(self._on_report)
        self._started = True
        self._accepting = True

    async def stop(self, grace_seconds: float = 0.0) -> None:
        """Stop accepting; let running requests finish for up to `grace_seconds`; abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_seconds
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.cancel_all()
        self._stopping = True
        if self._started:
            self.host.send(STOP)
            await asyncio.to_thread(self.host.join, 10)

    def cancel_all(self) -> None:
        """Abort every request in flight: each stream ends with an ABORT output now."""
        for stream in list(self._streams.values()):
            stream.end_now()

    @property
    def alive(self) -> bool:
        return self._started and self.host.alive and not (self._stopping or self._host_ended)

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    @property
    def num_in_flight(self) -> int:
        return len(self._streams) + self._reserved

    @contextlib.contextmanager
    def reserving(self) -> Iterator[None]:
        """A slot of the in-flight bound held while a request is prepared (its grammar compiling, off the event
        loop), so that the work before admission is bounded as the requests admitted are; EngineOverloaded if
        none is free. The slot is let go before the request is submitted."""
        self._check_room()
        self._reserved += 1
        try:
            yield
        finally:
            self._reserved -= 1

    def _check_room(self) -> None:
        if self.num_in_flight >= self.max_in_flight:
            raise EngineOverloaded(f"{self.num_in_flight} requests in flight; the limit is {self.max_in_flight}")

    @property
    def max_model_len(self) -> int:
        return self.host.max_model_len

    def problem(self) -> str | None:
        return self.host.problem()

    def load(self) -> EngineLoad:
        """The core's counters as of its last report (the loop reports every iteration)."""
        return self._load

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; raises EngineOverloaded when the bounded queue is full."""
        if not self.accepting:
            raise EngineStopped("the engine is not accepting requests")
        self._check_room()
        request.sampling.check()
        stream = RequestStream(
            request, self.tokenizer, abort=self.cancel, on_finished=self._stream_finished, metrics=self.metrics
        )
        self._streams[request.request_id] = stream
        self.host.send(Submit(request.request_id, list(request.prompt_ids), request.sampling, request.adapter))
        return stream

    def cancel(self, request_id: str) -> None:
        self.host.send(Abort(request_id))

    def profile(self, steps: int, stem: str, with_stack: bool = False) -> ProfileSteps:
        """Have the engine profile its next `steps` steps into the returned command's `trace` and `summary`
        files (with Python's frames if `with_stack`), one profile at a time (ProfileBusy)."""
        if not self.alive:
            raise EngineStopped("the engine is not running")
        if self._profiles_sent > self._profiles_done:
            raise ProfileBusy("a profile of the engine's steps is being taken: ask again once it is written")
        self._profiles_sent += 1
        command = ProfileSteps(steps, stem, with_stack)
        self.host.send(command)
        return command

    def _stream_finished(self, stream: RequestStream, reason: FinishReason) -> None:
        self._streams.pop(stream.request_id, None)
        if self.metrics:
            self.metrics.requests.labels(stream.label, reason.value).inc()
            self.metrics.prompt_tokens.labels(stream.label).inc(len(stream.request.prompt_ids))
            self.metrics.generation_tokens.labels(stream.label).inc(stream.num_generated)
            self.metrics.e2e.observe(time.monotonic() - stream.submitted_at)

    def _deliver(self, outputs: list[SeqOutput], last: bool = False) -> None:
        """On the event loop: route each output to its stream. After the host's last report, every stream
        still open fails: looked up here, so that one submitted while the report was on its way is too."""
        if last:
            outputs = outputs + self._orphans(outputs)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output)

    # -- reports ----------------------------------------------------------------------------------
    def _on_report(self, report: StepReport) -> None:
        self.last_heartbeat = time.monotonic()
        self._load = report.load
        # a count only the loop keeps: reports the hosts make themselves (refused sends, the last) carry 0
        self._profiles_done = max(self._profiles_done, report.profiles_done)
        if report.last:
            self._host_ended = True  # before the delivery below: no submit after it can be missed
        if self.metrics is not None:
            self._observe(report)
        if not (report.outputs or report.last):
            return
        if threading.get_ident() == self._loop_thread:
            self._deliver(report.outputs, report.last)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is gone, nobody is left to read
                self._loop.call_soon_threadsafe(self._deliver, report.outputs, report.last)

    def _orphans(self, outputs: list[SeqOutput]) -> list[SeqOutput]:
        ended = {output.request_id for output in outputs if output.finish_reason is not None}
        error = self.host.problem() or "the engine stopped"
        return [
            SeqOutput(request_id, finish_reason=FinishReason.ERROR, error=error, unavailable=True)
            for request_id in list(self._streams)
            if request_id not in ended
        ]

    def _observe_load(self, load: EngineLoad) -> None:
        self.metrics.observe_load(
            waiting=load.waiting,
            running=load.running,
            kv_usage=load.kv_usage,
            kv_blocks=load.kv_blocks,
            block_size=load.block_size,
        )
        self.metrics.observe_adapters(load.running_adapters, load.waiting_adapters)

    def _observe(self, report: StepReport) -> None:
        m, load, reported = self.metrics, report.load, self._reported
        self._observe_load(load)
        m.preemptions.inc(load.preemptions - reported.preemptions)
        m.prefix_queries.inc(load.prefix_queries - reported.prefix_queries)
        m.prefix_hits.inc(load.prefix_hits - reported.prefix_hits)
        self._reported = load
        if report.step is not None:
            step = report.step
            m.observe_step(
                step.num_tokens,
                step.num_seqs,
                step.num_prefill_tokens,
                step.seconds,
                step.device_wait_seconds,
                step.phase_seconds,
                step.cpu_seconds,
            )
