"""Where an engine step's time goes: torch.profiler over decode steps of a full batch, then over one
step that also prefills new prompts (eager, as every step with prefill is). Returns the top operators
by device time and by host time, so a GPU run says which kernels and which Python to work on next."""

from __future__ import annotations

import random

from torch.profiler import ProfilerActivity, profile

from bench.decode_floor import decoding_core, random_prompt
from server.engine.config import EngineConfig
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence

TOP = 15


def profile_steps(model, batch: int, context: int, steps: int, engine_config: EngineConfig) -> dict:
    core, _ = decoding_core(model, batch, context, steps + 1, engine_config)
    on_gpu = next(model.parameters()).device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as decode:
        for _ in range(steps):
            core.step()
    rng = random.Random(1)
    newcomers = max(1, batch // 8)
    sampling = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for i in range(newcomers):
        core.add(Sequence(f"n{i}", random_prompt(rng, context, model.config.vocab_size), sampling))
    with profile(activities=activities) as mixed:
        core.step()
    return {"decode_steps": steps, "decode": top_ops(decode, steps, on_gpu), "mixed": top_ops(mixed, 1, on_gpu)}


def top_ops(profiled, steps: int, on_gpu: bool) -> dict:
    """Per step: the operators with the most device time and with the most host time (self times, ms)."""
    events = profiled.key_averages()

    def rows(key: str) -> list[dict]:
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:TOP]
        return [
            {"name": e.key[:80], "calls": e.count / steps, "ms": getattr(e, key) / 1000 / steps}
            for e in ranked
            if getattr(e, key) > 0
        ]

    device_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    return {
        "device": rows(device_key) if on_gpu else [],
        "host": rows("self_cpu_time_total"),
    }
