"""A profile's summary, read from its timeline (the Chrome trace torch.profiler writes): the operators
with the most device time and the most host time per step, self times (a host operator's time less the
operators it called). The engine's profiler (step_profiler.py) runs this in a process of its own once
the trace is written, so that reading a large trace never holds the engine loop up:

    python -m server.engine.profile_summary TRACE SUMMARY --steps N [--header TEXT]

bench/step_profile.py reads its own profiles with the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from collections.abc import Iterable

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"cpu_op", "cuda_runtime", "cuda_driver"}
TOP = 25


def read_events(trace_path: str) -> list[dict]:
    with open(trace_path) as trace:
        return json.load(trace)["traceEvents"]


def top_events(events: Iterable[dict], steps: int, top: int = TOP) -> dict:
    """{"device": [...], "host": [...]}: per step, the `top` names with the most self time, each
    {"name", "calls", "ms"}."""
    device: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    host_by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for event in events:
        if event.get("ph") != "X":
            continue
        if event.get("cat") in DEVICE_CATEGORIES:
            totals = device[event["name"]]
            totals[0] += 1
            totals[1] += float(event["dur"])
        elif event.get("cat") in HOST_CATEGORIES:
            host_by_thread[(event.get("pid"), event.get("tid"))].append(event)
    host: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for thread_events in host_by_thread.values():
        for name, self_us in _self_times(thread_events):
            totals = host[name]
            totals[0] += 1
            totals[1] += self_us
    return {"device": _rows(device, steps, top), "host": _rows(host, steps, top)}


def _self_times(events: list[dict]) -> Iterable[tuple[str, float]]:
    """(name, self time in us) of one thread's events, which nest: each event's time less its children's."""
    events = sorted(events, key=lambda e: (float(e["ts"]), -float(e["dur"])))
    open_events: list[list] = []  # [name, end, self time left], innermost last

    def close_until(time: float):
        while open_events and open_events[-1][1] <= time:
            name, _, self_us = open_events.pop()
            yield name, self_us

    for event in events:
        start, duration = float(event["ts"]), float(event["dur"])
        yield from close_until(start)
        if open_events:
            open_events[-1][2] -= duration
        open_events.append([event["name"], start + duration, duration])
    yield from close_until(float("inf"))


def _rows(totals: dict[str, list[float]], steps: int, top: int) -> list[dict]:
    ranked = sorted(totals.items(), key=lambda item: item[1][1], reverse=True)[:top]
    return [
        {"name": name[:80], "calls": count / steps, "ms": total / 1000 / steps}
        for name, (count, total) in ranked
        if total > 0
    ]


def summary_text(header: str, ops: dict) -> str:
    lines = [header.rstrip("\n")]
    for side in ("device", "host"):
        if ops[side]:
            lines.append(f"{side} time per step (self), ms, calls per step, operator:")
            lines += [f"  {op['ms']:9.3f} {op['calls']:9.1f}  {op['name']}" for op in ops[side]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("summary")
    parser.add_argument("--steps", type=int, required=True, help="steps the trace covers (figures are per step)")
    parser.add_argument("--header", default="", help="lines to put first")
    args = parser.parse_args(argv)
    text = summary_text(args.header, top_events(read_events(args.trace), args.steps))
    with open(f"{args.summary}.part", "w") as out:  # the summary appears whole
        out.write(text)
    os.replace(f"{args.summary}.part", args.summary)


if __name__ == "__main__":
    main()
