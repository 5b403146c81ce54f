"""The engine core: owns the scheduler, KV cache, model runner and sampler; `step()` runs one iteration
and reports what each sequence produced. Not thread-safe: a core loop (core_loop.py) drives it from its
own thread or process, and the async front end (async_engine.py) talks to that loop.

Async scheduling (`EngineConfig.async_scheduling`) splits a step into its launch and the read of its
sampled tokens, and reads them in the next `step()`, after that one's launch: while the device runs
step N, the host schedules and launches step N+1 (whose decoding rows take their input tokens from
step N's draw on the device) and then reads step N's tokens. Where the device has already finished
step N when step N+1 begins (on a GPU, an engine whose host is the bottleneck), step N is read first,
as without async scheduling. A sequence's drawn-but-unread token is
"pending" (`Sequence.num_pending`); the scheduler counts it, and a sequence whose pending token is its
last by length (`Sequence.ending`) is not scheduled again. One that stops on EOS or a stop token is
known to have stopped a step late: its row in that step is computed and dropped. The check that a
step's adapter edits left the hidden states finite is read with its tokens too (`EditCheck`); until
then the edited sequences' blocks stay out of the prefix cache. Tokens, logprobs and finish reasons
equal the synchronous engine's (tests/test_async_scheduling.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from server.engine.compiled_layers import compile_layers, first_compilation
from server.engine.config import EngineConfig, EngineConfigError, decode_graphs_apply, resolve_attention_backend
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.grammar import UNAVAILABLE, GrammarBroken, GrammarFailed, Grammars, advance, grammars_for
from server.engine.kv_cache import KVCache, KVLayout
from server.engine.memory import auto_kv_budget
from server.engine.model_runner import EditCheck, ModelRunner, StepResult
from server.engine.prompt_logprobs import PromptScores
from server.engine.sampler import Draw, PendingTokens, Sample, Sampler
from server.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from server.engine.scheduler import ScheduledChunk, Scheduler
from server.engine.sequence import FinishReason, Sequence, SequenceStatus
from server.engine.transfers import to_device
from server.metrics import STEP_PHASES

log = logging.getLogger(__name__)


@dataclass
class SeqOutput:
    """What one step produced for one request."""

    request_id: str
    new_tokens: list[int] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_prompt: int = 0
    num_generated: int = 0
    unavailable: bool = False  # failed because the engine stopped, not for anything of its own: retry elsewhere
    prompt_logprobs: list[Sample] | None = None  # with the first token, where asked: prompt tokens 1.. scored


@dataclass(frozen=True)
class EngineLoad:
    """The core's counters for gauges and probes: totals since start where named so."""

    waiting: int
    running: int
    kv_usage: float  # share of the KV pool's blocks in use
    kv_blocks: int
    block_size: int
    running_adapters: list[str]  # each adapter name once, sorted; base requests have none
    waiting_adapters: list[str]
    preemptions: int  # total
    prefix_queries: int  # total blocks looked up in the prefix cache
    prefix_hits: int  # total


@dataclass
class InFlight:
    """A launched step that the host has not read yet: its drawn tokens (one draw for all its rows, or one
    per row where the batched draw failed), the finite check of its ReFT edits and its prompt logprobs."""

    parts: list[tuple[list[Sequence], Draw]]
    check: EditCheck | None = None
    scores: PromptScores | None = None

    @property
    def seqs(self) -> list[Sequence]:
        return [seq for seqs, _ in self.parts for seq in seqs]

    @property
    def constrained(self) -> bool:
        """Whether a row drew under a grammar: its next mask needs this step's token."""
        return any(seq.grammar is not None for seq in self.seqs)

    @property
    def owners(self) -> list[Sequence]:
        """Every sequence whose outcome this step decides, each once."""
        checked = self.check.owners if self.check is not None else []
        scored = [s.seq for s in self.scores.scored] if self.scores is not None else []
        return list(dict.fromkeys([*self.seqs, *checked, *scored]))

    @property
    def _copies(self) -> list:
        return [draw for _, draw in self.parts] + [c for c in (self.check, self.scores) if c is not None]

    @property
    def waited(self) -> float:
        """Seconds the host blocked for the device while reading this step."""
        return sum(copy.waited for copy in self._copies)

    def landed(self) -> bool:
        """Whether reading this step would not wait for the device."""
        return all(copy.landed() for copy in self._copies)

    def pending(self) -> PendingTokens | None:
        if not self.parts:
            return None
        draws = [draw.tokens for _, draw in self.parts]
        tokens = draws[0] if len(draws) == 1 else torch.cat(draws)
        return PendingTokens(tokens, {seq: row for row, seq in enumerate(self.seqs)})


@dataclass(frozen=True)
class StepStats:
    num_tokens: int
    num_seqs: int
    num_prefill_tokens: int
    seconds: float
    device_wait_seconds: float  # of `seconds`, blocked for the device's results (of the step before, if async)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # of `seconds`, by STEP_PHASES
    # of `seconds`, the CPU time of the thread that stepped: the rest it spent off the CPU, waiting to run (for the
    # GIL, which another thread of the process held, or for a core). On CUDA its device waits count as CPU time:
    # CUDA's synchronizations spin by default
    cpu_seconds: float = 0.0


class PhaseClock:
    """Splits a step's time into STEP_PHASES: `lap(phase)` charges the time since the last lap to `phase`.
    It also counts the CPU time of the thread that laps, until its last lap (`cpu_seconds`)."""

    def __init__(self):
        self.seconds = dict.fromkeys(STEP_PHASES, 0.0)
        self.cpu_seconds = 0.0  # until the last lap; read inside the wall clock's span, so never more than it
        self._mark = time.perf_counter()
        self._cpu_start = time.thread_time()

    def lap(self, phase: str) -> None:
        self.cpu_seconds = time.thread_time() - self._cpu_start
        now = time.perf_counter()
        self.seconds[phase] += now - self._mark
        self._mark = now


# the sampling parameters whose draw holds the most memory per row: the warm-up step's
COSTLIEST_SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, logprobs=MAX_LOGPROBS)


class EngineCore:
    def __init__(
        self,
        model: nn.Module,
        config: EngineConfig,
        eos_token_ids: set[int],
        make_runner: Callable[..., ModelRunner] = ModelRunner,  # (model, kv, attention_backend, **graphs)
        grammars: Grammars | None = None,  # structured outputs; None: requests for them are refused
    ):
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        tensor_parallel = getattr(model, "tp_size", None) or 1
        backend = resolve_attention_backend(config.attention_backend, device.type)
        graphs_wanted = tensor_parallel == 1 and decode_graphs_apply(config.cuda_graphs, backend)
        layout = KVLayout.from_config(model.config, dtype).sharded(tensor_parallel)  # a rank caches its KV heads
        compile_backend = config.compile_backend if tensor_parallel == 1 else None
        if config.compile_backend is not None and compile_backend is None:  # the ranks would have to compile alike
            log.info("the forward is not compiled with tensor parallelism")
        if compile_backend is not None:
            self._compile_layers(model, layout, config, compile_backend)
        if config.num_blocks is not None:
            self.kv = KVCache(layout, config.num_blocks, config.block_size, device, config.prefix_caching)
        else:
            budget = config.kv_cache_bytes
            if budget is None:
                if tensor_parallel > 1 and device.type == "cuda":  # the warm-up step would need the whole group
                    raise EngineConfigError(
                        ("kv_cache_bytes",),
                        "give its size with tensor parallelism: sizing it from the device's "
                        "memory would take a warm-up step of the whole group",
                    )
                warm_up = lambda: self._warm_up_step(model, layout, config, compile_backend)  # noqa: E731
                graphs = partial(self._decode_graphs_bytes, model, layout, config) if graphs_wanted else None
                budget = auto_kv_budget(model, warm_up, config.gpu_memory_utilization, graphs)
            self.kv = KVCache.from_budget(
                layout, budget, config.block_size, device, prefix_caching=config.prefix_caching
            )
        self.max_model_len = self._context_window(model, config)
        self.scheduler = Scheduler(self.kv, config)
        self.runner = make_runner(
            model,
            self.kv,
            config.attention_backend,
            cuda_graphs=graphs_wanted,  # a tensor-parallel group's ranks would have to replay in step
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            compile_backend=compile_backend,
            fused_kernels=config.fused_kernels,
            step_token_multiple=config.step_token_multiple,
        )
        self.sampler = Sampler(frozenset(eos_token_ids), grammars)
        self.grammars = grammars
        self.eos_token_ids = eos_token_ids
        self.sequences: dict[str, Sequence] = {}
        self.last_step: StepStats | None = None
        # a tensor-parallel group's followers would need the drawn tokens too: there each step is read at once
        self.async_scheduling = config.async_scheduling and tensor_parallel == 1
        # where the device runs behind the host, a step it already finished is read before the next one is
        # scheduled (see `step`); on the CPU every step has finished by then, and async would never defer
        self.read_landed_first = device.type == "cuda"
        self._in_flight: InFlight | None = None
        self._unreturned: list[SeqOutput] = []  # read by a step that then raised: the next step returns them
        # sequences whose grammar is compiling: they join the scheduler once it has (`_admit_compiled`)
        self._compiling: list[tuple[Sequence, Future]] = []

    @staticmethod
    def _warm_up_step(
        model: nn.Module, layout: KVLayout, config: EngineConfig, compile_backend: str | None, tokens: int | None = None
    ) -> StepResult:
        """One prefill, by default of the largest step the scheduler can make (its peak memory is what the KV
        budget must leave room for), in a pool of its own, with the attention backend and the compiled layers
        that will serve. It scores its prompt (prompt_logprobs.py), as a step may: a logits row per token.
        Then it draws a token for as many rows as a step may sample, through the sampler's costliest path
        (float32 copies of the logits, the sort of top-k and top-p, logprobs), whose peak counts too."""
        # padded like every eager step (step_token_multiple); a step of fewer tokens may pad to a few more rows
        tokens = tokens or config.max_batched_tokens
        window = getattr(model.config, "max_position_embeddings", None) or tokens
        tokens = min(tokens, window)
        device = next(model.parameters()).device
        kv = KVCache(layout, -(-tokens // config.block_size), config.block_size, device, prefix_caching=False)
        seq = Sequence("warm-up", [0] * tokens, SamplingParams(max_new_tokens=1, prompt_logprobs=MAX_LOGPROBS))
        kv.allocate(seq, tokens)
        runner = ModelRunner(
            model,
            kv,
            config.attention_backend,
            compile_backend=compile_backend,
            fused_kernels=config.fused_kernels,
            step_token_multiple=config.step_token_multiple,
        )
        result = runner.run([ScheduledChunk(seq, 0, tokens)])
        if result.scored:
            PromptScores(result.prompt_logits, result.scored).read()
        drawing = [Sequence(f"warm-up-{i}", [0], COSTLIEST_SAMPLING) for i in range(config.max_num_seqs)]
        Sampler()(result.logits.expand(len(drawing), -1).clone(), drawing).samples()
        return result

    @classmethod
    def _compile_layers(cls, model: nn.Module, layout: KVLayout, config: EngineConfig, backend: str) -> None:
        """Compile the decoder layers of the steps that prefill (compiled_layers.py) now, before serving and
        before the KV pool is sized, with two warm-up steps: the largest, and one of a single token, which
        torch.compile specializes. Logs what it took."""
        started = time.perf_counter()
        with first_compilation():
            cls._warm_up_step(model, layout, config, backend)
            cls._warm_up_step(model, layout, config, backend, tokens=1)
        fields = {"backend": backend, "seconds": round(time.perf_counter() - started, 2)}
        fields["compiled"] = not compile_layers(model, backend).failed
        log.info("decoder layers compiled for the steps that prefill", extra={"fields": fields})

    @staticmethod
    def _decode_graphs_bytes(model: nn.Module, layout: KVLayout, config: EngineConfig) -> int:
        """What the decode graphs will keep on the device: their largest bucket, captured over a pool of its
        own of one block per sequence (the block tables' width does not change the graphs' memory)."""
        device = next(model.parameters()).device
        kv = KVCache(layout, config.max_num_seqs + 1, config.block_size, device, prefix_caching=False)
        before = torch.cuda.memory_reserved(device)
        graphs = DecodeGraphs(model, kv, config.max_num_seqs, config.block_size, config.compile_backend)
        graphs.capture_all(largest_only=True)
        torch.cuda.synchronize(device)
        return torch.cuda.memory_reserved(device) - before

    def _context_window(self, model: nn.Module, config: EngineConfig) -> int:
        """max_model_len: as configured, or the model's window capped by what the KV pool holds."""
        window = getattr(model.config, "max_position_embeddings", None) or self.kv.capacity_tokens
        usable = self.kv.capacity_tokens - config.block_size  # one watermark block stays free on admission
        if config.max_model_len is None:
            if usable < window:
                log.warning(
                    "the KV cache holds %d tokens: max_model_len capped at %d (model: %d)",
                    usable + config.block_size,
                    usable,
                    window,
                )
            return min(window, usable)
        if config.max_model_len > window:
            raise EngineConfigError(
                ("max_model_len",), f"{config.max_model_len} exceeds the model's context window {window}"
            )
        if usable < config.max_model_len:
            raise EngineConfigError(
                ("kv_cache_bytes", "max_model_len"),
                f"the KV cache holds {self.kv.capacity_tokens} tokens, less than {config.max_model_len} plus one "
                "block: give the KV cache more memory or lower max_model_len",
            )
        return config.max_model_len

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; raises ValueError if it can never fit the context window."""
        if not seq.prompt_ids:
            raise ValueError("the prompt is empty")
        if seq.request_id in self.sequences:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if seq.num_prompt >= self.max_model_len:
            raise ValueError(f"the prompt has {seq.num_prompt} tokens; the context window is {self.max_model_len}")
        if seq.sampling.grammar is not None:
            if self.grammars is None:
                raise ValueError(UNAVAILABLE)
            # compiled off this thread, which goes on stepping the others meanwhile
            self._compiling.append((seq, self.grammars.compile(seq.sampling.grammar)))
        else:
            self.scheduler.add(seq)
        self.sequences[seq.request_id] = seq

    def has_work(self) -> bool:
        return self._steppable or bool(self._compiling)

    @property
    def _steppable(self) -> bool:
        """Whether a step has something to schedule, read or return now."""
        return self.scheduler.has_work() or self._in_flight is not None or bool(self._unreturned)

    @property
    def only_compiling(self) -> bool:
        """Whether all there is to do is wait for grammars to compile: a loop may sleep a little first."""
        return not self._steppable and not any(compiled.done() for _, compiled in self._compiling)

    def _admit_compiled(self) -> list[SeqOutput]:
        """Sequences whose grammar has compiled join the scheduler, each with a matcher of its own; those whose
        grammar does not compile fail, saying why."""
        outputs, still = [], []
        for seq, compiled in self._compiling:
            if not compiled.done():
                still.append((seq, compiled))
            elif (error := compiled.exception()) is not None:
                outputs.append(self._finish(seq, FinishReason.ERROR, str(error)))
            else:
                seq.grammar = compiled.result().deep_copy()
                self.scheduler.add(seq)
        self._compiling = still
        return outputs

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.config.max_num_seqs

    def idle(self) -> None:
        """The engine loop has nothing to run (a tensor-parallel driver pings its group)."""
        self.runner.idle()

    def problem(self) -> str | None:
        """Why the core cannot serve (a lost tensor-parallel peer), for the readiness probe."""
        return self.runner.problem()

    def load(self) -> EngineLoad:
        scheduler, kv = self.scheduler, self.kv
        return EngineLoad(
            waiting=len(scheduler.waiting) + len(self._compiling),
            running=len(scheduler.running),
            kv_usage=kv.usage(),
            kv_blocks=kv.num_blocks,
            block_size=kv.block_size,
            running_adapters=_adapter_names(scheduler.running),
            waiting_adapters=_adapter_names([*scheduler.waiting, *(seq for seq, _ in self._compiling)]),
            preemptions=scheduler.num_preemptions,
            prefix_queries=kv.prefix_queries,
            prefix_hits=kv.prefix_hits,
        )

    def abort(self, request_id: str) -> SeqOutput | None:
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        # what a step that raised read for it goes out now, with its finish: nothing may follow a finish
        held = [o for o in self._unreturned if o.request_id == request_id]
        self._unreturned = [o for o in self._unreturned if o.request_id != request_id]
        tokens, samples = [t for o in held for t in o.new_tokens], [s for o in held for s in o.samples]
        prompt = next((o.prompt_logprobs for o in held if o.prompt_logprobs is not None), None)
        return self._finish(seq, FinishReason.ABORT, new_tokens=tokens, samples=samples, prompt_logprobs=prompt)

    def step(self) -> list[SeqOutput]:
        """One iteration: schedule chunks, run the model once over them (with ReFT's plan for their
        edits), fail the requests whose edit failed, advance the rest, draw the tokens of the rows that
        sample. With async scheduling the drawn tokens are read in the next iteration, after its own
        launch, so the host's work overlaps the device's; without, at once. But a step the device has
        already finished when the next begins (the host is the bottleneck: long eager steps) is read
        first: its tokens reach the clients a step sooner, and the scheduler sees which requests ended. So is a
        step with rows held to a grammar, whose next masks need its tokens (grammar.py). Requests whose grammar
        has compiled since the last step join the scheduler first."""
        clock = PhaseClock()
        self.last_step = None
        previous, self._in_flight = self._in_flight, None
        outputs, self._unreturned = self._unreturned, []
        read_first = False
        try:
            outputs += self._admit_compiled()
            read_first = previous is not None and (
                previous.constrained or (self.read_landed_first and previous.landed())
            )
            if read_first:
                outputs += self._read_or_fail(previous)
                clock.lap("read")
            chunks = self.scheduler.schedule()
            clock.lap("schedule")
            launched, failed = self._launch(chunks, None if read_first else previous) if chunks else (None, [])
            clock.lap("launch")
        except BaseException:
            self._unreturned = outputs  # the next step returns them: no token read is lost
            if not read_first:
                self._in_flight = previous  # read by the next step: a drawn token is never lost
            raise
        try:
            if previous is not None and not read_first:
                outputs += self._read_or_fail(previous)
            # after the read: a request that ended at its last token (EOS) ends so, not with this failure
            outputs += [self._finish(seq, FinishReason.ERROR, error) for seq, error in failed if not seq.finished]
        except BaseException:
            self._accept(launched, read_now=False)  # the next step reads it: no token or edit check is lost
            self._unreturned = outputs  # and returns what was read here
            raise
        outputs += self._accept(launched, read_now=not self.async_scheduling)
        clock.lap("read")
        if chunks:
            prefill = sum(c.length for c in chunks if c.prefills)
            tokens = sum(c.length for c in chunks)
            read = previous if self.async_scheduling else launched  # the step whose results were read here
            waited = read.waited if read is not None else 0.0
            seconds = sum(clock.seconds.values())  # the whole step: its last lap is its end
            self.last_step = StepStats(tokens, len(chunks), prefill, seconds, waited, clock.seconds, clock.cpu_seconds)
        return outputs

    def _launch(
        self, chunks: list[ScheduledChunk], previous: InFlight | None
    ) -> tuple[InFlight | None, list[tuple[Sequence, str]]]:
        """Run the step and draw its tokens; returns what the host must read of it (None if nothing) and
        the requests that failed, to fail once `previous` (the step before, not read yet) has been read."""
        pending = previous.pending() if previous is not None else None
        try:
            result = self.runner.run(chunks, pending)
        except Exception as e:  # the step as a whole failed: fail its requests, keep serving
            log.exception("engine step failed")
            return None, [(c.seq, f"{type(e).__name__}: {e}") for c in chunks]
        launched = InFlight([], result.check)
        for scored in result.scored:  # counted at launch: the next step may recompute them (a preemption)
            scored.seq.num_prompt_scored = scored.first + scored.count - 1
        if result.check is not None:  # K/V an edit could have poisoned stay out of the prefix cache until `_settle`
            for seq in result.check.owners:
                seq.unchecked_edits += 1
        failed = list(result.failures.items())  # their K/V lack an edit: they must never enter the prefix cache
        try:
            self.scheduler.complete([c for c in chunks if c.seq not in result.failures])
            if result.scored:
                launched.scores = PromptScores(result.prompt_logits, result.scored)
            seqs = [chunk.seq for chunk in result.sampling]
            rows = [i for i, seq in enumerate(seqs) if seq not in result.failures]
            if rows:
                logits = result.logits
                if len(rows) < len(seqs):  # a list index would be a blocking copy: queue it behind the forward
                    logits = logits.index_select(0, to_device(rows, torch.long, logits.device))
                launched.parts, unsampled = self._draw(logits, [seqs[i] for i in rows], pending)
                failed += unsampled
        except Exception as e:  # a bug: fail the step's requests, but keep its edit check to settle
            log.exception("engine step failed after its forward")
            launched.parts, failed = [], [(c.seq, f"{type(e).__name__}: {e}") for c in chunks]
        return (launched if launched.parts or launched.check or launched.scores else None), failed

    def _draw(
        self, logits: Tensor, seqs: list[Sequence], pending: PendingTokens | None
    ) -> tuple[list[tuple[list[Sequence], Draw]], list[tuple[Sequence, str]]]:
        """Draw every row at once; if that raises, row by row, so a fault fails only its own request.
        Returns the draws with their rows, and the rows that failed."""
        try:
            return [(seqs, self.sampler(logits, seqs, pending))], []
        except Exception:
            log.exception("batched sampling failed; sampling row by row")
        parts, failed = [], []
        for i, seq in enumerate(seqs):
            try:
                parts.append(([seq], self.sampler(logits[i : i + 1], [seq], pending)))
            except Exception as e:
                failed.append((seq, f"sampling failed: {type(e).__name__}: {e}"))
        return parts, failed

    def _accept(self, launched: InFlight | None, read_now: bool) -> list[SeqOutput]:
        """The launched step's drawn tokens become pending; read it now, or leave it for the next step."""
        if launched is None:
            return []
        for seq in launched.seqs:
            seq.num_pending += 1
            seq.ending = self._at_length_limit(seq, seq.num_pending)
        if read_now:
            return self._read_or_fail(launched)
        self._in_flight = launched
        return []

    def _read_or_fail(self, in_flight: InFlight) -> list[SeqOutput]:
        """`_read`, but a read that raises (a bug) consumes the step all the same: what it read goes out,
        and its requests still running fail, so none waits forever on a token or an edit check."""
        outputs: list[SeqOutput] = []
        try:
            self._read(in_flight, outputs)
        except Exception as e:
            log.exception("reading a step failed")
            error = f"reading the step failed: {type(e).__name__}: {e}"
            outputs += [self._finish(seq, FinishReason.ERROR, error) for seq in in_flight.owners if not seq.finished]
        return outputs

    def _read(self, in_flight: InFlight, outputs: list[SeqOutput]) -> None:
        """The host learns a launched step's outcome, into `outputs`: first which edits blew up, then the
        drawn tokens, appended where a stop rule allows. A sequence that ended meanwhile (aborted, failed)
        drops its token."""
        if in_flight.check is not None:
            outputs += self._settle(in_flight.check)
        if in_flight.scores is not None:
            for seq, samples in in_flight.scores.read():
                seq.prompt_logprobs += samples
        for seqs, draw in in_flight.parts:
            for seq in seqs:
                seq.num_pending -= 1  # `ending` stays: it counted this token and any drawn since
            try:
                for seq, sample in zip(seqs, draw.samples(), strict=True):
                    if not seq.finished:
                        outputs.append(self._append(seq, sample))
            except Exception as e:  # a bug, not a request's fault: end the rows left, keep serving
                log.exception("reading the sampled tokens failed")
                error = f"sampling failed: {type(e).__name__}: {e}"
                outputs += [self._finish(seq, FinishReason.ERROR, error) for seq in seqs if not seq.finished]

    def _settle(self, check: EditCheck) -> list[SeqOutput]:
        """Fail the requests whose adapter edit left non-finite hidden states; the others' blocks may now
        enter the prefix cache."""
        try:
            failures = check.failures()
        except Exception as e:  # unverifiable: their K/V must not be trusted
            log.exception("reading the edit check failed")
            failures = dict.fromkeys(check.owners, f"checking the adapter's edit failed: {type(e).__name__}: {e}")
        outputs = [self._finish(seq, FinishReason.ERROR, error) for seq, error in failures.items() if not seq.finished]
        for seq in check.owners:
            seq.unchecked_edits -= 1
            if not seq.finished:
                self.kv.cache_full_blocks(seq)
        return outputs

    def _append(self, seq: Sequence, sample: Sample) -> SeqOutput:
        seq.token_ids.append(sample.token)
        produced = {"new_tokens": [sample.token], "samples": [sample]}  # counted now: delivered whatever follows
        if seq.num_generated == 1 and seq.sampling.prompt_logprobs is not None:
            produced["prompt_logprobs"] = seq.prompt_logprobs
        try:
            if self.async_scheduling:  # a block its pending token completed is indexed now, before finishing frees it
                self.kv.cache_full_blocks(seq)
        except Exception as e:  # a bug in the prefix cache: this request ends, with its token
            log.exception("indexing a sequence's blocks failed")
            return self._finish(seq, FinishReason.ERROR, f"{type(e).__name__}: {e}", **produced)
        try:
            complete = seq.grammar is not None and advance(seq.grammar, sample.token)
        except GrammarFailed as e:  # the request's grammar, not a bug: it fails, saying why
            return self._finish(seq, FinishReason.ERROR, str(e), **produced)
        except GrammarBroken as e:  # a bug: the mask allowed what the matcher refuses
            log.exception("a drawn token broke its grammar")
            return self._finish(seq, FinishReason.ERROR, str(e), **produced)
        # a complete grammar allows EOS alone: drawn, it ends the request, even one that ignores EOS
        ended = complete and sample.token in self.eos_token_ids
        reason = self._stop_reason(seq, sample.token) or (FinishReason.STOP if ended else None)
        if reason is not None:
            return self._finish(seq, reason, **produced)
        return self._output(seq, **produced)

    def _at_length_limit(self, seq: Sequence, pending: int = 0) -> bool:
        """Whether the sequence's tokens, with `pending` more, reach max_new_tokens or the context window."""
        generated, total = seq.num_generated + pending, len(seq.token_ids) + pending
        return generated >= seq.sampling.max_new_tokens or total >= self.max_model_len

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        sampling = seq.sampling
        if (token in self.eos_token_ids and not sampling.ignore_eos) or token in sampling.stop_token_ids:
            return FinishReason.STOP
        if self._at_length_limit(seq):
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None, **produced) -> SeqOutput:
        self.scheduler.remove(seq)
        if self._compiling:
            self._compiling = [(other, compiled) for other, compiled in self._compiling if other is not seq]
        self.sequences.pop(seq.request_id, None)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        output = self._output(seq, **produced)
        output.finish_reason, output.error = reason, error
        return output

    @staticmethod
    def _output(
        seq: Sequence,
        new_tokens: list[int] | None = None,
        samples: list[Sample] | None = None,
        prompt_logprobs: list[Sample] | None = None,
    ) -> SeqOutput:
        return SeqOutput(
            seq.request_id,
            new_tokens or [],
            samples or [],
            num_prompt=seq.num_prompt,
            num_generated=seq.num_generated,
            prompt_logprobs=prompt_logprobs,
        )


def _adapter_names(sequences) -> list[str]:
    """Each adapter name once, sorted so that the same set always reads the same."""
    return sorted({seq.edit.name for seq in sequences if seq.edit is not None})


def serving_core(
    model: nn.Module, config: EngineConfig, tokenizer, make_runner: Callable[..., ModelRunner] = ModelRunner
) -> EngineCore:
    """The core a server runs: EOS from the model and its tokenizer, structured outputs over that tokenizer."""
    eos = model_eos_ids(model, tokenizer)
    return EngineCore(model, config, eos, make_runner, grammars_for(tokenizer, model.config.vocab_size, eos))


def model_eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """EOS ids from the generation config (may be a list), the model config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
