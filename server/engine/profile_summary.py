"""A profile's summary, read from its timeline (the Chrome trace torch.profiler writes), per step:
- the operators with the most device time, and those with the most host time, self times (a host
  operator's time less the operators it called);
- with Python frames in the trace (`with_stack=True`), the Python functions with the most time of their
  own: the interpreter's, outside the functions and operators they called. A step's host time beyond
  its operators' is there;
- the host's waits for the device (CUDA's `...Synchronize` calls) by the Python function that made them
  (without frames, by the operator): each one stalls the host until the device has run everything queued
  before it.
The engine's profiler (step_profiler.py) runs this in a process of its own once the trace is written, so
that reading a large trace never holds the engine loop up:

    python -m server.engine.profile_summary TRACE SUMMARY --steps N [--thread TID] [--header TEXT]

bench/step_profile.py reads its own profiles with the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
PYTHON_CATEGORY = "python_function"
HOST_CATEGORIES = {"cpu_op", "cuda_runtime", "cuda_driver", PYTHON_CATEGORY}
WAIT_MARK = "Synchronize"  # cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize
TOP = 25
SIDES = {  # top_events' lists, as the summary titles them
    "device": "device time per step (self), ms, calls per step, operator:",
    "host": "host time per step (self), ms, calls per step, operator:",
    "python": "Python's own time per step (outside what it called), ms, calls per step, function:",
    "waits": "host waits for the device per step, ms, calls per step, where:",
}
# a frame's object address, which would make every call of a builtin a name of its own
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def read_events(trace_path: str) -> list[dict]:
    with open(trace_path) as trace:
        return json.load(trace)["traceEvents"]


def top_events(events: Iterable[dict], steps: int, top: int = TOP, thread: int | None = None) -> dict:
    """{side: [...]} for each of SIDES: per step, the `top` names with the most time, each {"name", "calls",
    "ms"}. "python" stays empty without Python frames in the trace, and counts the thread `thread` alone (a
    native thread id) if given: the stepping thread's, not its neighbours' waits on their queues."""
    totals: dict[str, dict[str, list[float]]] = {side: defaultdict(lambda: [0, 0.0]) for side in SIDES}
    host_by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for event in events:
        if event.get("ph") != "X":
            continue
        if event.get("cat") in DEVICE_CATEGORIES:
            _add(totals["device"], event["name"], float(event["dur"]))
        elif event.get("cat") in HOST_CATEGORIES:
            host_by_thread[(event.get("pid"), event.get("tid"))].append(event)
    for (_, tid), thread_events in host_by_thread.items():
        for event, self_us, enclosing in _nested(thread_events):
            name = _ADDRESS.sub("", event["name"])
            if event.get("cat") != PYTHON_CATEGORY:
                _add(totals["host"], name, self_us)
            elif thread is None or tid == thread:
                _add(totals["python"], name, self_us)
            if WAIT_MARK in name:
                _add(totals["waits"], f"{name} in {_caller(enclosing)}", float(event["dur"]))
    return {side: _rows(side_totals, steps, top) for side, side_totals in totals.items()}


def _add(totals: dict[str, list[float]], name: str, us: float) -> None:
    entry = totals[name]
    entry[0] += 1
    entry[1] += us


def _nested(events: list[dict]) -> Iterable[tuple[dict, float, list[dict]]]:
    """(event, self time in us, for a wait the events it ran inside, outermost first) of one thread's events,
    which nest: each event's time less its children's."""
    events = sorted(events, key=lambda e: (float(e["ts"]), -float(e["dur"])))
    open_events: list[list] = []  # [event, end, self time left], innermost last

    def close_until(time: float):
        while open_events and open_events[-1][1] <= time:
            event, _, self_us = open_events.pop()
            enclosing = [entry[0] for entry in open_events] if WAIT_MARK in event["name"] else []
            yield event, self_us, enclosing

    for event in events:
        start, duration = float(event["ts"]), float(event["dur"])
        yield from close_until(start)
        if open_events:
            open_events[-1][2] -= duration
        open_events.append([event, start + duration, duration])
    yield from close_until(float("inf"))


def _caller(enclosing: list[dict]) -> str:
    """The innermost Python function around a wait that is not a builtin (without frames, its innermost
    operator)."""
    frames = [e["name"] for e in enclosing if e.get("cat") == PYTHON_CATEGORY and not e["name"].startswith("<")]
    operators = [e["name"] for e in enclosing if e.get("cat") == "cpu_op"]
    return (frames or operators or ["?"])[-1]


def _rows(totals: dict[str, list[float]], steps: int, top: int) -> list[dict]:
    ranked = sorted(totals.items(), key=lambda item: item[1][1], reverse=True)[:top]
    return [
        {"name": name[:80], "calls": count / steps, "ms": total / 1000 / steps}
        for name, (count, total) in ranked
        if total > 0
    ]


def summary_text(header: str, ops: dict) -> str:
    lines = [header.rstrip("\n")]
    for side, title in SIDES.items():
        if ops.get(side):
            lines.append(title)
            lines += [f"  {op['ms']:9.3f} {op['calls']:9.1f}  {op['name']}" for op in ops[side]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("summary")
    parser.add_argument("--steps", type=int, required=True, help="steps the trace covers (figures are per step)")
    parser.add_argument("--thread", type=int, help="native id of the thread whose Python time to count (default all)")
    parser.add_argument("--header", default="", help="lines to put first")
    args = parser.parse_args(argv)
    text = summary_text(args.header, top_events(read_events(args.trace), args.steps, thread=args.thread))
    with open(f"{args.summary}.part", "w") as out:  # the summary appears whole
        out.write(text)
    os.replace(f"{args.summary}.part", args.summary)


if __name__ == "__main__":
    main()
