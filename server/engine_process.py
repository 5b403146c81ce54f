"""The engine core in a process of its own: the GPU default (`--engine-core process`).

Under load the event loop turns every token of every stream into an HTTP chunk. In one process that
Python work and the engine's take turns on the GIL, and each step waits for the loop's share. In a
process of its own the core steps while the loop streams, as vLLM's engine-core process does.

The server's process keeps the API, the tokenizer, detokenization and the adapter registry (on the
CPU); the engine process loads the model and runs `CoreLoop`. They talk over two pipes:
- commands, to the engine: submit, abort, stop. A request's adapter is named by digest; its tensors
  travel once, with the first request that uses it, and the sender tells the engine what to drop when
  its record exceeds the residency budget (the tensor-parallel mirror's bookkeeping, adapter_mirror.py);
- reports, back: one `StepReport` per loop iteration, which is also the engine's heartbeat.
Commands leave the server from a thread, so the event loop never waits on a full pipe; reports are
read by the event loop itself when the pipe has data (no reader thread to hand the GIL to), and the
engine process reads commands in a thread, so its loop never waits on them. Messages are plain
pickles: tensors travel by value, not through shared memory.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from server.config import Settings
from server.distributed.adapter_mirror import AdapterPayload, AdapterReceiver, AdapterSender
from server.engine.core import EngineCore, EngineLoad, model_eos_ids
from server.engine.core_loop import STOP, CoreLoop, Refuse, StepReport, Submit
from server.logging_setup import setup_logging
from server.model_facts import ModelFacts
from server.models.loader import load_model, resolve_device, resolve_dtype
from server.plugins import load_plugins

log = logging.getLogger(__name__)
EXIT_SECONDS = 10.0


class EngineProcessFailed(RuntimeError):
    """The engine process could not start, or is gone."""


@dataclass
class WireSubmit:
    """`Submit` as it crosses the pipe: the adapter by digest, its tensors only the first time."""

    submit: Submit  # adapter None
    adapter_digest: str | None
    new_adapters: dict[str, AdapterPayload]
    dropped_adapters: list[str]


@dataclass(frozen=True)
class Started:
    """The engine process's first message: its model is loaded and the core is built."""

    model: ModelFacts
    max_num_seqs: int
    max_model_len: int
    load: EngineLoad


@dataclass(frozen=True)
class StartFailed:
    error: str


class CoreProcess:
    """The server's side: spawns the engine process, waits until its model is loaded, then relays."""

    def __init__(self, settings: Settings, model_path: str):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or CUDA state
        command_end, self._commands = context.Pipe(duplex=False)
        self._reports, report_end = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_engine_main,
            args=(settings, model_path, command_end, report_end),
            name="reft-engine-core",
            daemon=True,
        )
        self.process.start()
        command_end.close()
        report_end.close()
        self._adapters = AdapterSender(int(settings.adapter_memory), settings.max_resident_adapters)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.failure: str | None = None
        self._stopping = False  # STOP was sent: the process's exit is expected
        self._reaping = threading.Lock()  # one waitpid at a time: a second would see no exit code
        started = self._wait_for_start()
        self.model = started.model
        self.max_num_seqs = started.max_num_seqs
        self.max_model_len = started.max_model_len
        self._first_load = self._last_load = started.load

    def _wait_for_start(self) -> Started:
        while not self._reports.poll(1.0):
            if (code := self._exit_code()) is not None:
                raise EngineProcessFailed(f"the engine process exited with code {code} at start-up")
        message = self._receive()
        if isinstance(message, StartFailed):
            self._wait_for_exit(EXIT_SECONDS)
            raise EngineProcessFailed(f"the engine process could not start: {message.error}")
        return message

    def _receive(self):
        return pickle.loads(self._reports.recv_bytes())

    def start(self, sink: Callable[[StepReport], None]) -> EngineLoad:
        """On the event loop: hand it every report to `sink` as it arrives; send commands from a thread."""
        self._sink = sink
        self._event_loop = asyncio.get_running_loop()
        self._event_loop.add_reader(self._reports.fileno(), self._read_reports)
        threading.Thread(target=self._relay_commands, name="reft-engine-commands", daemon=True).start()
        return self._first_load

    def send(self, command) -> None:
        """Queue a command (any thread); the adapter bookkeeping happens in the order of sending."""
        self._stopping = self._stopping or command == STOP
        self._outbox.put(command)

    @property
    def alive(self) -> bool:
        return self.failure is None and self._exit_code() is None

    def problem(self) -> str | None:
        if self.failure is None and (code := self._exit_code()) is not None:
            self.failure = f"the engine process exited with code {code}"
        return self.failure

    def join(self, timeout: float) -> None:
        if not self._wait_for_exit(timeout):
            log.warning("the engine process did not stop within %g s: killing it", timeout)
            self.process.kill()
            self._wait_for_exit(EXIT_SECONDS)

    def _wait_for_exit(self, timeout: float) -> bool:
        if not multiprocessing.connection.wait([self.process.sentinel], timeout):
            return False
        with self._reaping:
            self.process.join()  # it is exiting: this returns at once
        return True

    def _exit_code(self) -> int | None:
        with self._reaping:
            return self.process.exitcode

    def _relay_commands(self) -> None:
        while True:
            command = self._outbox.get()
            try:
                self._commands.send_bytes(pickle.dumps(self._wire(command)))
            except (OSError, EOFError) as e:  # the engine process is gone: the report relay says so
                self.failure = self.failure or f"the engine process is unreachable: {e}"
                return
            if command == STOP:
                return

    def _wire(self, command):
        if not isinstance(command, Submit):
            return command
        adapter = command.adapter
        if adapter is None:
            return WireSubmit(command, None, {}, [])
        new, dropped = self._adapters.update({adapter.digest: adapter})
        return WireSubmit(replace(command, adapter=None), adapter.digest, new, dropped)

    def _read_reports(self) -> None:
        """On the event loop, when the pipe has data: every report waiting. Reading here rather than in
        a thread of its own spares a GIL handoff per report while the loop is busy streaming."""
        try:
            while self._reports.poll():
                report = self._receive()
                self._last_load = report.load
                self._sink(report)
        except (OSError, EOFError):  # the engine process is gone (or stopped)
            self._event_loop.remove_reader(self._reports.fileno())
            threading.Thread(target=self._report_exit, name="reft-engine-exit", daemon=True).start()

    def _report_exit(self) -> None:
        self._wait_for_exit(EXIT_SECONDS)
        if self.problem() is not None and not self._stopping:
            log.error("%s", self.failure)
        self._sink(StepReport([], replace(self._last_load, waiting=0, running=0), last=True))


def _engine_main(settings: Settings, model_path: str, commands, reports) -> None:
    """The engine process: load the model, build the core, report that it is ready, run the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C drains the server, which then stops this process
    setup_logging(settings.log_level, settings.log_json)
    try:
        core = _build_core(settings, model_path)
    except BaseException as e:
        log.exception("the engine process could not start")
        reports.send_bytes(pickle.dumps(StartFailed(f"{type(e).__name__}: {e}")))
        return
    reports.send_bytes(
        pickle.dumps(Started(ModelFacts.of(core.runner.model), core.max_num_seqs, core.max_model_len, core.load()))
    )
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    loop = CoreLoop(core, outbox.put)
    parameter = next(core.runner.model.parameters())
    receiver = AdapterReceiver(parameter.dtype, parameter.device)
    threading.Thread(
        target=_receive_commands, args=(commands, loop, receiver), name="reft-engine-commands", daemon=True
    ).start()
    sender = threading.Thread(target=_send_reports, args=(outbox, reports, loop), name="reft-engine-reports")
    sender.start()
    loop.run()
    outbox.put(STOP)
    sender.join()


def _send_reports(outbox: queue.SimpleQueue, reports, loop: CoreLoop) -> None:
    """The engine process's side of the report pipe. A thread of its own pickles and writes each report
    while the loop goes on with the next step (the GIL is free while the step waits for the GPU)."""
    while (report := outbox.get()) != STOP:
        try:
            reports.send_bytes(pickle.dumps(report))
        except OSError:  # the server process is gone
            log.warning("the server process is gone: the engine process stops")
            loop.inbox.put(STOP)
            return


def _build_core(settings: Settings, model_path: str) -> EngineCore:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    load_plugins(settings.plugins)  # intervention types a plugin brings, before any adapter arrives
    device = resolve_device(settings.device)
    model, tokenizer = load_model(model_path, device, resolve_dtype(settings.dtype, device))
    return EngineCore(model, settings.engine_config(), model_eos_ids(model, tokenizer))


def _receive_commands(commands, loop: CoreLoop, receiver: AdapterReceiver) -> None:
    """The engine process's side of the command pipe: adapters in, then the command to the loop."""
    while True:
        try:
            message = pickle.loads(commands.recv_bytes())
        except (OSError, EOFError):  # the server process is gone
            loop.inbox.put(STOP)
            return
        if isinstance(message, WireSubmit):
            try:
                receiver.receive(message.new_adapters, message.dropped_adapters)
                adapter = receiver.adapters[message.adapter_digest] if message.adapter_digest else None
            except Exception as e:  # cannot materialize it here: fail this request alone
                log.exception("adapter transfer failed")
                loop.inbox.put(Refuse(message.submit.request_id, f"adapter transfer failed: {e}"))
                continue
            message = replace(message.submit, adapter=adapter)
        loop.inbox.put(message)
        if message == STOP:
            return
