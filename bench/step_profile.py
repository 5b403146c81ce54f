"""Where an engine step's time goes: torch.profiler over decode steps of a full batch, then over steps that
prefill a full token budget of new prompts (eager, as every step with prefill is), once without adapters
and once with a distinct adapter per prompt; then the same with most of the batch decoding beside the new
prompts ("mixed"), as a serving engine's steps with prefill mostly are under a steady load. Returns the top
operators by device time and by host time, the Python functions with the most time of their own, the host's
waits for the device by where they were made, and for each step with prefill how long the host took to
launch it against how long until the device was done, so a GPU run says which kernels and which Python to
work on next, and what adapters and decoding rows add to a step."""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace

from torch.profiler import ProfilerActivity, profile

from bench.decode_floor import decoding_core, random_prompt
from bench.device_timing import synchronize
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.profile_summary import read_events, top_events
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from server.reft.request_edit import request_edit

TOP = 15
# steps timed per phase, the median reported: run F timed one, and its mixed step with adapters took 36 ms to launch
# against 16-19 ms for the other phases, a figure one step cannot tell from an outlier
TIMED_STEPS = 3
PHASE_STEPS = 1 + TIMED_STEPS + 2  # prefill steps per phase: untimed, timed, profiled plainly and with frames
MAX_DRAIN_STEPS = 8  # steps that finish a step's new prompts: the last one's chunk, then reading the tokens


def profile_steps(
    model,
    batch: int,
    context: int,
    steps: int,
    engine_config: EngineConfig,
    prompt_len: tuple[int, int],
    adapters: list,
) -> dict:
    """Decode steps of `batch` sequences of ~`context` tokens; then prefill steps of `engine_config`'s token
    budget of prompts of `prompt_len` tokens, plain ("prefill") and each prompt with its own adapter
    ("prefill_adapters", cycling through `adapters`)."""
    core, _ = decoding_core(model, batch, context, 2 * steps + 1, engine_config)
    on_gpu = next(model.parameters()).device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])

    def decode_steps(around: profile) -> None:
        with around:
            for _ in range(steps):
                core.step()

    result = {"decode_steps": steps, "decode": profiled(decode_steps, activities, steps)}
    del core
    # async: a step returns once launched (nothing before it is in flight), so its host time shows apart
    room = engine_config.max_batched_tokens // prompt_len[0] + 1  # the most new prompts one step can take
    prefill_config = replace(engine_config, max_num_seqs=room, cuda_graphs=False, async_scheduling=True)
    rng = random.Random(1)
    core = EngineCore(model, prefill_config, set())
    for phase, edits in (("prefill", []), ("prefill_adapters", adapters)):
        result[phase] = profiled_prefill(core, rng, prompt_len, edits, activities)
    del core
    # the server's concurrency less the new prompts' room decodes; the decode steps between keep their graphs
    decoding = max(1, engine_config.max_num_seqs - room)
    mixed_config = replace(engine_config, async_scheduling=True)
    core, _ = decoding_core(model, decoding, context, 2 * PHASE_STEPS * (MAX_DRAIN_STEPS + 1), mixed_config, room=room)
    for phase, edits in (("mixed", []), ("mixed_adapters", adapters)):
        result[phase] = {"decoding": decoding, **profiled_prefill(core, rng, prompt_len, edits, activities, decoding)}
    return result


def profiled_prefill(
    core: EngineCore, rng: random.Random, prompt_len: tuple[int, int], adapters: list, activities, decoding: int = 0
) -> dict:
    """`prefill_step` untimed (the step's shapes cost once: kernel choices), TIMED_STEPS times timed (the
    median step's figures, and every step's launch), then profiled (`profiled`): PHASE_STEPS in all."""
    prefill_step(core, rng, prompt_len, adapters, decoding=decoding)
    timed = [prefill_step(core, rng, prompt_len, adapters, decoding=decoding) for _ in range(TIMED_STEPS)]
    prompts, launch_ms, done_ms = sorted(timed, key=lambda figures: figures[1])[len(timed) // 2]
    ops = profiled(lambda around: prefill_step(core, rng, prompt_len, adapters, around, decoding), activities, 1)
    launches = [round(figures[1], 2) for figures in timed]
    return {"prompts": prompts, "launch_ms": launch_ms, "done_ms": done_ms, "launches_ms": launches, **ops}


def profiled(run: Callable[[profile], object], activities, steps: int) -> dict:
    """`run(profiler)` twice, per step: plainly for the operators' device and host times, then with Python's
    frames (whose tracing slows every operator) for Python's own time and the waits by function."""
    plain, framed = profile(activities=activities), profile(activities=activities, with_stack=True)
    run(plain)
    run(framed)
    frames = top_ops(framed, steps)
    return {**top_ops(plain, steps), "python": frames["python"], "waits": frames["waits"]}


def prefill_step(
    core: EngineCore, rng: random.Random, prompt_len: tuple[int, int], adapters: list, around=None, decoding: int = 0
) -> tuple:
    """One step over the token budget that `decoding` sequences decoding beside it leave to new prompts (the last
    one chunked), timed: (prompts, ms until the step returned, ms until the device finished it); then the new
    prompts' work drained, untimed. `around` (a profiler) covers the step and the device finishing it, not the
    drain."""
    budget = core.scheduler.config.max_batched_tokens - decoding
    vocab = core.runner.model.config.vocab_size
    sampling = SamplingParams(max_new_tokens=1, ignore_eos=True)
    tokens, prompts = 0, 0
    while tokens < budget:
        prompt = random_prompt(rng, rng.randint(*prompt_len), vocab)
        adapter = adapters[prompts % len(adapters)] if adapters else None
        core.add(Sequence(f"p{rng.random()}", prompt, sampling, request_edit(adapter, len(prompt))))
        tokens, prompts = tokens + len(prompt), prompts + 1
    device = next(core.runner.model.parameters()).device
    synchronize(device)
    with around or nullcontext():
        started = time.perf_counter()
        core.step()
        launched = time.perf_counter()
        synchronize(device)
        done = time.perf_counter()
    for _ in range(MAX_DRAIN_STEPS):
        if drained(core, decoding):
            break
        core.step()
    if not drained(core, decoding):
        raise RuntimeError(f"the new prompts still ran after {MAX_DRAIN_STEPS} steps")
    return prompts, 1000 * (launched - started), 1000 * (done - started)


def drained(core: EngineCore, decoding: int) -> bool:
    """Whether only the `decoding` sequences are left (without any: nothing at all, no step in flight)."""
    if not decoding:
        return not core.has_work()
    return not core.scheduler.waiting and len(core.scheduler.running) <= decoding


def top_ops(profiled: profile, steps: int) -> dict:
    """Per step: the operators with the most device time and with the most host time (self times, ms), this
    thread's Python functions with the most time of their own, and the host's waits for the device."""
    with tempfile.TemporaryDirectory() as directory:
        trace = os.path.join(directory, "trace.json")
        profiled.export_chrome_trace(trace)
        return top_events(read_events(trace), steps, TOP, thread=threading.get_native_id())
