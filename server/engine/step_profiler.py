"""The engine's next steps under torch.profiler, on request: where a serving engine's step time goes under
real load (`POST /v1/admin/profile` with REFT_PROFILE_DIR set, as vLLM's profiler endpoints).

The loop (core_loop.py) starts a session on a `ProfileSteps` command and stops it after that many steps have
run. It writes the timeline, `<stem>.trace.json` (Perfetto, chrome://tracing), on request with Python's
frames (`with_stack`), and starts a process that reads it into `<stem>.txt`: the steps' mean durations by
kind, the operators with the most device and host time per step, the host's waits for the device by the
operator that made them, and with the frames, by the function, and the stepping thread's Python time by
function (profile_summary.py). Reading a large trace takes seconds of Python, which the loop must not spend:
it only stops the profiler and writes the trace (about a second for 300 steps of a tiny model on a CPU;
Python's frames make it several times larger). Each file appears whole, the summary last. Profiling slows
the steps it covers (Python's frames most of all); nothing else changes, and a failure to profile or to
write is logged, never raised into the loop.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from server.engine.core import StepStats
from server.metrics import STEP_PHASES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileSteps:
    """A command for the loop: profile its next `steps` steps, and write `<stem>.trace.json` and `<stem>.txt`;
    with `with_stack`, with Python's frames too."""

    steps: int
    stem: str
    with_stack: bool = False

    @property
    def trace(self) -> str:
        return f"{self.stem}.trace.json"

    @property
    def summary(self) -> str:
        return f"{self.stem}.txt"


@dataclass
class _Session:
    command: ProfileSteps
    profiler: profile
    thread: int  # the stepping thread's native id: the summary's Python time is this thread's
    steps: list[StepStats] = field(default_factory=list)


class StepProfiler:
    """At most one session at a time, driven by the loop's thread alone. `done` counts the commands it has
    finished with (written, failed, or dropped at the loop's end), so the front end knows when the next
    may come."""

    def __init__(self):
        self.done = 0
        self._session: _Session | None = None
        self._summarizers: list[subprocess.Popen] = []

    def start(self, command: ProfileSteps) -> None:
        if self._session is not None:  # the front end sends one at a time: this would be a bug
            log.warning("a profile is being taken already: %s is dropped", command.stem)
            self.done += 1
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        try:
            profiler = profile(activities=activities, with_stack=command.with_stack)
            profiler.start()
        except Exception:
            log.exception("the profiler could not start")
            self.done += 1
            return
        self._session = _Session(command, profiler, threading.get_native_id())
        log.info("profiling the engine's next steps", extra={"fields": {"steps": command.steps, "to": command.stem}})

    def stepped(self, stats: StepStats) -> None:
        """After each step that ran: the session ends after its last."""
        session = self._session
        if session is None:
            return
        session.steps.append(stats)
        if len(session.steps) >= session.command.steps:
            self._session = None
            self._finish(session)

    def close(self) -> None:
        """The loop ends: a session still open is written with the steps it has."""
        session, self._session = self._session, None
        if session is not None:
            self._finish(session)

    def _finish(self, session: _Session) -> None:
        command = session.command
        self._summarizers = [p for p in self._summarizers if p.poll() is None]  # reap the finished
        try:
            session.profiler.stop()
            Path(command.stem).parent.mkdir(parents=True, exist_ok=True)
            session.profiler.export_chrome_trace(f"{command.trace}.part")
            os.replace(f"{command.trace}.part", command.trace)
            summarize = [sys.executable, "-m", "server.engine.profile_summary", command.trace, command.summary]
            summarize += ["--steps", str(max(1, len(session.steps))), "--thread", str(session.thread)]
            summarize += ["--header", header(session.steps)]
            self._summarizers.append(subprocess.Popen(summarize, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        except Exception:
            log.exception("writing the profile %s failed", command.stem)
        else:
            log.info("profile written", extra={"fields": {"steps": len(session.steps), "to": command.stem}})
        finally:
            self.done += 1


def header(steps: list[StepStats]) -> str:
    """The summary's first lines: how many steps, and their mean duration, tokens and wait by kind."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [f"reft-server: {len(steps)} engine steps under torch.profiler ({device}; profiling slows them)"]
    prefilled = [s for s in steps if s.num_prefill_tokens]
    decoded = [s for s in steps if not s.num_prefill_tokens]
    for kind, chosen in (("prefilled", prefilled), ("only decoded", decoded)):
        if chosen:
            means = step_means(chosen)
            tokens = sum(s.num_tokens for s in chosen) / len(chosen)
            split = ", ".join(f"{phase} {ms:.2f}" for phase, ms in means["phase_mean_ms"].items())
            lines.append(
                f"  {len(chosen)} steps {kind}: {tokens:.0f} tokens, {means['mean_ms']:.2f} ms mean ({split}), "
                f"{means['cpu_mean_ms']:.2f} ms of it on the engine thread's CPU, {means['device_wait_mean_ms']:.2f} "
                "ms blocked for the device"
            )
    return "\n".join(lines)


def step_means(steps: list[StepStats]) -> dict:
    """The mean step of `steps` (zeros if none), in ms: its duration, phases, thread's CPU time and device wait."""
    count = max(1, len(steps))

    def mean(seconds) -> float:
        return 1000 * sum(seconds) / count

    return {
        "mean_ms": mean(s.seconds for s in steps),
        "phase_mean_ms": {phase: mean(s.phase_seconds.get(phase, 0.0) for s in steps) for phase in STEP_PHASES},
        "cpu_mean_ms": mean(s.cpu_seconds for s in steps),
        "device_wait_mean_ms": mean(s.device_wait_seconds for s in steps),
    }
