"""The loop that drives an `EngineCore`, and the thread that runs it in the server's own process.

The loop takes commands (submit, abort, profile, stop) from an inbox, steps the core while it has work, and
hands a `StepReport` to its sink after every iteration: what the step produced, the core's load and
the step's statistics. The same loop runs in a thread (`CoreThread`, here) or in a process of its own
(server/engine_process.py); the async front end (async_engine.py) consumes the reports either way.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from server.engine.core import EngineCore, EngineLoad, SeqOutput, StepStats
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import FinishReason, Sequence
from server.engine.step_profiler import ProfileSteps, StepProfiler
from server.reft.adapter import Adapter
from server.reft.request_edit import request_edit

log = logging.getLogger(__name__)
IDLE_WAIT_SECONDS = 0.5  # an idle loop still reports this often: its heartbeat
COMPILE_POLL_SECONDS = 0.005  # how often a loop with nothing but compiling grammars looks whether one is done
# steps in a row that raise before the loop gives up: stepping the same sequences again cannot help, and
# a loop that went on would spin with its heartbeat fresh while every request hangs
MAX_STEP_FAILURES = 3


@dataclass
class Submit:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    adapter: Adapter | None = None


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Refuse:
    """A request the engine's side could not take (its adapter failed to arrive): end it with an error."""

    request_id: str
    error: str


STOP = "stop"


@dataclass
class StepReport:
    """One iteration of the loop: the outputs it produced, and the core's load after it."""

    outputs: list[SeqOutput]
    load: EngineLoad
    step: StepStats | None = None  # set when the iteration ran a step
    last: bool = False  # the host's last report: the core is gone, nothing in flight will finish
    profiles_done: int = 0  # profile commands the loop has finished with (step_profiler.py)


class Inbox:
    """Commands for the loop, from any thread; `take` waits only when asked to."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()

    def put(self, command) -> None:
        self._queue.put(command)
        self._ready.set()

    def take(self, wait: float) -> list:
        """Every command queued so far, after waiting up to `wait` seconds for the first."""
        if wait > 0:
            self._ready.wait(wait)
        self._ready.clear()
        commands = []
        while True:
            try:
                commands.append(self._queue.get_nowait())
            except queue.Empty:
                return commands


class CoreLoop:
    def __init__(self, core: EngineCore, sink: Callable[[StepReport], None]):
        self.core = core
        self.inbox = Inbox()
        self._sink = sink
        self._stopping = False
        self._step_failures = 0  # steps in a row that raised
        self.profiler = StepProfiler()

    def run(self) -> None:
        """Until a STOP command: apply commands, step while there is work, report every iteration. A step
        that raises is logged and the loop goes on, unless MAX_STEP_FAILURES steps in a row raise."""
        try:
            self._run()
        finally:  # a profile still being taken is written with what it has, and the profiler let go
            self.profiler.close()

    def _run(self) -> None:
        while not self._stopping:
            busy = self.core.has_work()
            commands = self.inbox.take(wait=self._wait(busy))
            outputs = [output for command in commands if (output := self._apply(command)) is not None]
            step = None
            if self.core.has_work():
                try:
                    outputs.extend(self.core.step())
                    self._step_failures = 0
                except Exception:  # the core contains per-request failures; this is a bug
                    log.exception("unexpected engine error")
                    self._step_failures += 1
                    if self._step_failures >= MAX_STEP_FAILURES:  # the host ends: requests in flight fail now,
                        raise  # and the probes say why
                step = self.core.last_step
                if step is not None:
                    self.profiler.stepped(step)
            elif not commands:
                self.core.idle()
            try:
                self._sink(StepReport(outputs, self.core.load(), step, profiles_done=self.profiler.done))
            except Exception:  # a bug on the receiving side must not stop the engine
                log.exception("reporting a step failed")

    def _wait(self, busy: bool) -> float:
        """How long to wait for a command before stepping: not at all while steps have work, a little while
        all there is waits for grammars to compile (off this thread), else until a command comes."""
        if not busy:
            return IDLE_WAIT_SECONDS
        return COMPILE_POLL_SECONDS if self.core.only_compiling else 0

    def _apply(self, command) -> SeqOutput | None:
        """One command; a request's command that fails ends that request alone."""
        if command == STOP:
            self._stopping = True
            return None
        if isinstance(command, Refuse):
            return _failed(command.request_id, command.error)
        if isinstance(command, ProfileSteps):
            self.profiler.start(command)
            return None
        try:
            if isinstance(command, Submit):
                return self._submit(command)
            return self.core.abort(command.request_id)
        except Exception as e:
            log.exception("engine command failed")
            return _failed(command.request_id, f"{type(e).__name__}: {e}")

    def _submit(self, command: Submit) -> SeqOutput | None:
        edit = request_edit(command.adapter, len(command.prompt_ids))
        seq = Sequence(command.request_id, list(command.prompt_ids), command.sampling, edit)
        try:
            self.core.add(seq)
        except ValueError as e:
            return _failed(seq.request_id, str(e))
        return None


def _failed(request_id: str, error: str) -> SeqOutput:
    return SeqOutput(request_id, finish_reason=FinishReason.ERROR, error=error)


def stopped(load: EngineLoad) -> EngineLoad:
    """The load to report once the core is gone: nothing runs, waits or holds the cache."""
    return replace(load, waiting=0, running=0, kv_usage=0.0, running_adapters=[], waiting_adapters=[])


class CoreHost(Protocol):
    """Where a core steps, as the async front end sees it: a thread (below) or a process
    (server/engine_process.py). Reports reach the sink on a thread of the host's choosing (the
    engine thread; the event loop's for the process), the last one with `last` set."""

    max_num_seqs: int
    max_model_len: int
    first_load: EngineLoad  # before any report

    def start(self, sink: Callable[[StepReport], None]) -> None:
        """Start the loop; `sink` gets every report from now on."""

    def send(self, command) -> None:
        """Queue a command for the loop (Submit, Abort, ProfileSteps, STOP), from any thread."""

    @property
    def alive(self) -> bool: ...

    def problem(self) -> str | None:
        """Why the core cannot serve, for the readiness probe."""

    def join(self, timeout: float) -> None:
        """After STOP: wait for the loop to end."""


class CoreThread:
    """The engine core stepping in a thread of the server's process: the CPU default, and the only
    host for a core built around an already loaded model (tests) or a tensor-parallel group."""

    def __init__(self, core: EngineCore):
        self.core = core
        self.max_num_seqs = core.max_num_seqs
        self.max_model_len = core.max_model_len
        self.first_load = core.load()
        self.failure: str | None = None
        self._loop: CoreLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, sink: Callable[[StepReport], None]) -> None:
        self._loop = CoreLoop(self.core, sink)
        self._thread = threading.Thread(target=self._run, args=(sink,), name="reft-engine", daemon=True)
        self._thread.start()

    def _run(self, sink: Callable[[StepReport], None]) -> None:
        try:
            self._loop.run()
        except BaseException as e:
            log.exception("the engine thread died")
            self.failure = f"the engine thread died: {type(e).__name__}: {e}"
        finally:
            sink(StepReport([], stopped(self.core.load()), last=True))

    def send(self, command) -> None:
        self._loop.inbox.put(command)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def problem(self) -> str | None:
        return self.failure or self.core.problem()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
