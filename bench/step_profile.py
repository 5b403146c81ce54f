"""Where an engine step's time goes: torch.profiler over decode steps of a full batch, then over steps that
prefill a full token budget of new prompts (eager, as every step with prefill is), once without adapters
and once with a distinct adapter per prompt. Returns the top operators by device time and by host time,
and for each prefill step how long the host took to launch it against how long until the device was done,
so a GPU run says which kernels and which Python to work on next, and what adapters add to a step."""

from __future__ import annotations

import os
import random
import tempfile
import time
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
    core, _ = decoding_core(model, batch, context, steps + 1, engine_config)
    on_gpu = next(model.parameters()).device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as decode:
        for _ in range(steps):
            core.step()
    del core
    result = {"decode_steps": steps, "decode": top_ops(decode, steps)}
    # async: a step returns once launched (nothing before it is in flight), so its host time shows apart
    room = max(engine_config.max_num_seqs, engine_config.max_batched_tokens // prompt_len[0] + 1)
    prefill_config = replace(engine_config, max_num_seqs=room, cuda_graphs=False, async_scheduling=True)
    core = EngineCore(model, prefill_config, set())
    rng = random.Random(1)
    for phase, edits in (("prefill", []), ("prefill_adapters", adapters)):
        prefill_step(core, rng, prompt_len, edits)  # untimed: the step's shapes cost once (kernel choices)
        prompts, launch_ms, done_ms = prefill_step(core, rng, prompt_len, edits)
        profiled = profile(activities=activities)
        prefill_step(core, rng, prompt_len, edits, profiled)
        result[phase] = {
            "prompts": prompts,
            "launch_ms": launch_ms,
            "done_ms": done_ms,
            **top_ops(profiled, 1),
        }
    return result


def prefill_step(
    core: EngineCore, rng: random.Random, prompt_len: tuple[int, int], adapters: list, around=None
) -> tuple:
    """One step over a full token budget of new prompts (the last one chunked), timed: (prompts, ms until the
    step returned, ms until the device finished it); then the rest of its work drained, untimed. `around`
    (a profiler) covers the step and the device finishing it, not the drain."""
    budget, vocab = core.scheduler.config.max_batched_tokens, core.runner.model.config.vocab_size
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
    while core.has_work():
        core.step()
    return prompts, 1000 * (launched - started), 1000 * (done - started)


def top_ops(profiled: profile, steps: int) -> dict:
    """Per step: the operators with the most device time and with the most host time (self times, ms)."""
    with tempfile.TemporaryDirectory() as directory:
        trace = os.path.join(directory, "trace.json")
        profiled.export_chrome_trace(trace)
        return top_events(read_events(trace), steps, TOP)
