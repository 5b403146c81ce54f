"""The engine core in a process of its own: the GPU default (`--engine-core process`).

Under load the event loop turns every token of every stream into an HTTP chunk. In one process that
Python work and the engine's take turns on the GIL, and each step waits for the loop's share. In a
process of its own the core steps while the loop streams, as vLLM's engine-core process does.

The server's process keeps the API, the tokenizer, detokenization and the adapter registry (on the
CPU); the engine process loads the model and runs `CoreLoop`. They talk over two pipes:
- commands, to the engine: submit, abort, profile, stop. A request's adapter is named by digest; its tensors
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
import os
import pickle
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from server.config import Settings
from server.distributed.adapter_mirror import AdapterPayload, AdapterReceiver, AdapterSender
from server.engine.config import EngineConfigError
from server.engine.core import EngineCore, EngineLoad, SeqOutput, serving_core
from server.engine.core_loop import STOP, CoreLoop, Refuse, StepReport, Submit, stopped
from server.engine.sequence import FinishReason
from server.gc_freeze import exit_without_teardown, freeze_long_lived
from server.logging_setup import setup_logging
from server.model_facts import ModelFacts
from server.model_load_errors import ModelLoadError
from server.models.loader import load_model, resolve_device, resolve_dtype
from server.pipe_frames import FrameReader
from server.plugins import load_plugins

log = logging.getLogger(__name__)
EXIT_SECONDS = 10.0


class EngineProcessFailed(RuntimeError):
    """The engine process could not start, or is gone."""


@dataclass(frozen=True)
class AdapterRef:
    digest: str  # what the engine process keys its copy by: one copy serves every name with that content
    name: str
    version: int


@dataclass
class WireSubmit:
    """A `Submit` with an adapter, as it crosses the pipe: the adapter by reference, its tensors only the
    first time, and the adapters the engine process should drop."""

    submit: Submit  # adapter None
    adapter: AdapterRef
    new_adapters: dict[str, AdapterPayload]
    dropped_adapters: list[str]


@dataclass(frozen=True)
class LostAdapter:
    """From the engine process: it could not take (or no longer has) an adapter's tensors, so the server
    must send them again the next time."""

    digest: str


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
    # a setting the engine refused, or model files it cannot load: the server raises it as it is
    refusal: EngineConfigError | ModelLoadError | None = None


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
        try:
            started = self._wait_for_start()
        except BaseException:  # a failed start, or the server interrupted while the model loads
            self.abandon()
            raise
        self.model = started.model
        self.max_num_seqs = started.max_num_seqs
        self.max_model_len = started.max_model_len
        self.first_load = self._last_load = started.load

    def _wait_for_start(self) -> Started:
        try:
            message = self._receive()  # the first message, or the end of the pipe if the process dies
        except (OSError, EOFError):
            self._wait_for_exit(EXIT_SECONDS)
            raise EngineProcessFailed(f"the engine process exited with code {self._exit_code()} at start-up") from None
        if isinstance(message, StartFailed):
            self._wait_for_exit(EXIT_SECONDS)  # it exits once it has said so; a kill would leak its semaphores
            if message.refusal is not None:
                raise message.refusal
            raise EngineProcessFailed(f"the engine process could not start: {message.error}")
        return message

    def abandon(self) -> None:
        """Kill the engine process without a word (it serves nothing yet) and close the pipes."""
        if self._exit_code() is None:
            self.process.kill()
        self._wait_for_exit(EXIT_SECONDS)
        self._commands.close()
        self._reports.close()

    def _receive(self):
        return pickle.loads(self._reports.recv_bytes())

    def start(self, sink: Callable[[StepReport], None]) -> None:
        """On the event loop: it reads the reports as they arrive; commands go out from a thread."""
        self._sink = sink
        self._frames = FrameReader(self._reports.fileno())  # uvloop would make the pipe non-blocking anyway
        self._event_loop = asyncio.get_running_loop()
        self._event_loop.add_reader(self._reports.fileno(), self._read_reports)
        threading.Thread(target=self._relay_commands, name="reft-engine-commands", daemon=True).start()

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

    # -- commands, on their thread ------------------------------------------------------------------
    def _relay_commands(self) -> None:
        while True:
            command = self._outbox.get()
            try:
                with self._adapters.sending():
                    if (wire := self._wire(command)) is not None:
                        self._commands.send_bytes(pickle.dumps(wire))
            except (OSError, EOFError) as e:  # the engine process is gone: its report pipe says so
                self.failure = self.failure or f"the engine process is unreachable: {e}"
                break
            except Exception as e:  # a command that cannot be sent fails its request alone
                log.exception("a command for the engine process could not be sent")
                if isinstance(command, Submit):  # reported on the event loop, where every report reaches the sink
                    failed = SeqOutput(command.request_id, finish_reason=FinishReason.ERROR, error=f"not sent: {e}")
                    self._event_loop.call_soon_threadsafe(self._report_outputs, [failed])
            if command == STOP:
                break
        self._commands.close()

    def _wire(self, command):
        """What crosses the pipe for `command` (None: nothing). Only this thread touches `_adapters`."""
        if isinstance(command, LostAdapter):
            self._adapters.forget(command.digest)
            return None
        if not isinstance(command, Submit) or command.adapter is None:
            return command
        adapter = command.adapter
        new, dropped = self._adapters.update({adapter.digest: adapter})
        reference = AdapterRef(adapter.digest, adapter.name, adapter.version)
        return WireSubmit(replace(command, adapter=None), reference, new, dropped)

    # -- reports, on the event loop ---------------------------------------------------------------------
    def _read_reports(self) -> None:
        """When the pipe has data: the whole reports that arrived, then back to the loop. Reading here rather
        than in a thread of its own spares a GIL handoff per report while the loop streams."""
        for data in self._frames.read():
            message = pickle.loads(data)
            if isinstance(message, LostAdapter):
                self._outbox.put(message)  # for the command thread, which keeps the adapter record
                continue
            self._last_load = message.load
            self._report(message)
        if self._frames.closed:  # the engine process stopped, or is gone
            self._event_loop.remove_reader(self._reports.fileno())
            threading.Thread(target=self._report_exit, name="reft-engine-exit", daemon=True).start()

    def _report_outputs(self, outputs: list[SeqOutput]) -> None:
        """Outputs of the API process's own making, with the load last reported (a load older than one
        already reported would run the metrics' counters backwards)."""
        self._report(StepReport(outputs, self._last_load))

    def _report(self, report: StepReport) -> None:
        """Hand a report to the sink; a bug there must not lose the reports after it."""
        try:
            self._sink(report)
        except Exception:
            log.exception("reporting a step failed")

    def _report_exit(self) -> None:
        self._wait_for_exit(EXIT_SECONDS)
        self._reports.close()
        if not self._stopping:
            self.failure = self.problem() or "the engine process closed its report pipe"
            log.error("%s", self.failure)
        self._sink(StepReport([], stopped(self._last_load), last=True))


def _engine_main(settings: Settings, model_path: str, commands, reports) -> None:
    """The engine process: load the model, build the core, report that it is ready, run the loop."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the server drains first, then stops this process
        signal.signal(sig, signal.SIG_IGN)
    setup_logging(settings.log_level, settings.log_json)
    _exit_with_the_server()
    try:
        core = _build_core(settings, model_path)
    except (EngineConfigError, ModelLoadError) as e:  # the settings' or the files' mistake: the server says it
        reports.send_bytes(pickle.dumps(StartFailed(str(e), refusal=e)))
        return
    except BaseException as e:
        log.exception("the engine process could not start")
        reports.send_bytes(pickle.dumps(StartFailed(f"{type(e).__name__}: {e}")))
        return
    started = Started(ModelFacts.of(core.runner.model), core.max_num_seqs, core.max_model_len, core.load())
    freeze_long_lived("engine")
    reports.send_bytes(pickle.dumps(started))
    outbox: queue.SimpleQueue = queue.SimpleQueue()  # reports, and LostAdapter notices
    loop = CoreLoop(core, outbox.put)
    parameter = next(core.runner.model.parameters())
    receiver = AdapterReceiver(parameter.dtype, parameter.device)
    threading.Thread(
        target=_receive_commands, args=(commands, loop, receiver, outbox), name="reft-engine-commands", daemon=True
    ).start()
    sender = threading.Thread(target=_send_reports, args=(outbox, reports, loop), name="reft-engine-reports")
    sender.start()
    try:
        loop.run()
    finally:
        outbox.put(STOP)
        sender.join()
    exit_without_teardown(0)  # its start-up objects are frozen: a teardown would print Triton's leak warnings


def _exit_with_the_server() -> None:
    """A watchdog: when the server's process dies (SIGKILL included, even mid-load), this one follows."""
    server = multiprocessing.parent_process()

    def watch() -> None:
        multiprocessing.connection.wait([server.sentinel])
        log.warning("the server process is gone: the engine process exits")
        os._exit(1)

    threading.Thread(target=watch, name="reft-server-watch", daemon=True).start()


def _build_core(settings: Settings, model_path: str) -> EngineCore:
    load_plugins(settings.plugins)  # intervention types a plugin brings, before any adapter arrives
    device = resolve_device(settings.device)
    model, tokenizer = load_model(model_path, device, resolve_dtype(settings.dtype, device))
    settings.apply_torch_threads(device.type)
    return serving_core(model, settings.engine_config(device.type), tokenizer)


def _send_reports(outbox: queue.SimpleQueue, reports, loop: CoreLoop) -> None:
    """The engine process's side of the report pipe. A thread of its own pickles and writes each report
    while the loop goes on with the next step (the GIL is free while the step waits for the GPU)."""
    while (report := outbox.get()) != STOP:
        try:
            reports.send_bytes(pickle.dumps(report))
        except OSError:  # the server process is gone
            loop.inbox.put(STOP)
            return


def _receive_commands(commands, loop: CoreLoop, receiver: AdapterReceiver, reports: queue.SimpleQueue) -> None:
    """The engine process's side of the command pipe: adapters in, then the command to the loop."""
    while True:
        try:
            message = pickle.loads(commands.recv_bytes())
        except (OSError, EOFError):  # the server process is gone
            message = STOP
        except Exception:  # unreadable: the request is unknown, so stop and let the server report it
            log.exception("an unreadable command: the engine process stops")
            message = STOP
        if isinstance(message, WireSubmit):
            message = _with_adapter(message, receiver, reports)
        loop.inbox.put(message)
        if message == STOP:
            return


def _with_adapter(wire: WireSubmit, receiver: AdapterReceiver, reports: queue.SimpleQueue) -> Submit | Refuse:
    reference = wire.adapter
    try:
        receiver.receive(wire.new_adapters, wire.dropped_adapters)
        held = receiver.adapters[reference.digest]
    except Exception as e:  # cannot materialize it here (or lost it): fail this request, have it sent again
        log.exception("adapter transfer failed")
        receiver.adapters.pop(reference.digest, None)
        reports.put(LostAdapter(reference.digest))
        return Refuse(wire.submit.request_id, f"adapter transfer failed: {type(e).__name__}: {e}")
    return replace(wire.submit, adapter=replace(held, name=reference.name, version=reference.version))
