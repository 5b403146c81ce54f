"""The engine's next steps under torch.profiler, on request: where a serving engine's step time goes under
real load (`POST /v1/admin/profile` with REFT_PROFILE_DIR set, as vLLM's profiler endpoints).

The loop (core_loop.py) starts a session on a `ProfileSteps` command and stops it after that many steps
have run, then writes two files: `<stem>.txt`, the steps' mean durations by kind and the operators with
the most device time and the most host time per step (self times), and `<stem>.trace.json`, the whole
timeline for Perfetto or chrome://tracing; the summary appears last. Profiling slows the steps it
covers; nothing else changes, and a failure to profile or to write is logged, never raised into the loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from server.engine.core import StepStats

log = logging.getLogger(__name__)
TOP = 25


@dataclass(frozen=True)
class ProfileSteps:
    """A command for the loop: profile its next `steps` steps, and write `<stem>.txt` and `<stem>.trace.json`."""

    steps: int
    stem: str


@dataclass
class _Session:
    command: ProfileSteps
    profiler: profile
    steps: list[StepStats] = field(default_factory=list)


class StepProfiler:
    """At most one session at a time, driven by the loop's thread alone."""

    def __init__(self):
        self._session: _Session | None = None

    def start(self, command: ProfileSteps) -> None:
        if self._session is not None:
            log.warning("a profile is being taken already: %s is ignored", command.stem)
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        try:
            profiler = profile(activities=activities)
            profiler.start()
        except Exception:
            log.exception("the profiler could not start")
            return
        self._session = _Session(command, profiler)
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

    def _finish(self, session: _Session) -> None:
        stem = session.command.stem
        try:  # each file appears whole (written aside, then renamed), the summary last
            session.profiler.stop()
            Path(stem).parent.mkdir(parents=True, exist_ok=True)
            session.profiler.export_chrome_trace(f"{stem}.trace.json.part")
            os.replace(f"{stem}.trace.json.part", f"{stem}.trace.json")
            Path(f"{stem}.txt.part").write_text(summary(session.profiler, session.steps))
            os.replace(f"{stem}.txt.part", f"{stem}.txt")
        except Exception:
            log.exception("writing the profile %s failed", stem)
            return
        log.info("profile written", extra={"fields": {"steps": len(session.steps), "to": stem}})


def summary(profiled: profile, steps: list[StepStats]) -> str:
    """The steps' mean durations by kind, then the top operators per step by device and by host time."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [f"reft-server: {len(steps)} engine steps under torch.profiler ({device}; profiling slows them)"]
    prefilled = [s for s in steps if s.num_prefill_tokens]
    decoded = [s for s in steps if not s.num_prefill_tokens]
    for kind, chosen in (("prefilled", prefilled), ("only decoded", decoded)):
        if chosen:
            mean = 1000 * sum(s.seconds for s in chosen) / len(chosen)
            blocked = 1000 * sum(s.device_wait_seconds for s in chosen) / len(chosen)
            tokens = sum(s.num_tokens for s in chosen) / len(chosen)
            lines.append(
                f"  {len(chosen)} steps {kind}: {tokens:.0f} tokens, {mean:.2f} ms mean, {blocked:.2f} ms of it "
                "blocked for the device"
            )
    ops = top_ops(profiled, len(steps), torch.cuda.is_available())
    for side in ("device", "host"):
        if ops[side]:
            lines.append(f"{side} time per step (self), ms, calls per step, operator:")
            lines += [f"  {op['ms']:9.3f} {op['calls']:9.1f}  {op['name']}" for op in ops[side]]
    return "\n".join(lines) + "\n"


def top_ops(profiled: profile, steps: int, on_gpu: bool, top: int = TOP) -> dict:
    """Per step: the operators with the most device time and with the most host time (self times, ms)."""
    events = profiled.key_averages()

    def rows(key: str) -> list[dict]:
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
        return [
            {"name": e.key[:80], "calls": e.count / steps, "ms": getattr(e, key) / 1000 / steps}
            for e in ranked
            if getattr(e, key) > 0
        ]

    if not events:
        return {"device": [], "host": []}
    device_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    return {"device": rows(device_key) if on_gpu else [], "host": rows("self_cpu_time_total")}
