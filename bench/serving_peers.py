"""The same requests, all arriving at once, served by the engine and by the two ways transformers serves
a batch itself: `generate` on static left-padded batches, and `generate_batch` (its continuous batching).
Each function returns output tokens, seconds and tokens/s; only a request's own output tokens count.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import logging

import torch
from transformers import GenerationConfig

from bench.common import Request, left_padded
from bench.device_timing import timed
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.fused_rotary import transformers_own_rotation
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from server.engine.step_profiler import step_means
from server.reft.request_edit import request_edit

CB_LOGGER = "ContinuousBatchingLogger"  # transformers' continuous batching logs here, not under transformers.*


def throughput(tokens: int, seconds: float) -> dict:
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run_engine(model, requests: list[Request], adapters, config: EngineConfig) -> dict:
    """One EngineCore, built for this run (so no prompt finds another run's prefixes cached), serving
    every request at once, EOS ignored."""
    gc.collect()  # the last run's KV pool (16 GiB on a GPU) must be gone before this one allocates its own
    core = EngineCore(model, config, eos_token_ids=set())
    for index, request in enumerate(requests):
        adapter = adapters[request.adapter] if request.adapter is not None else None
        sampling = SamplingParams(max_new_tokens=request.max_new_tokens, ignore_eos=True)
        core.add(Sequence(f"r{index}", list(request.prompt), sampling, request_edit(adapter, len(request.prompt))))
    generated = 0
    steps = {"decode": [], "prefill": []}  # each step that only decoded / also prefilled
    device = next(model.parameters()).device
    with timed(device) as elapsed:
        while core.has_work():
            for output in core.step():
                if output.error:
                    raise RuntimeError(f"request {output.request_id} failed: {output.error}")
                generated += len(output.new_tokens)
            if core.last_step is not None:
                steps["prefill" if core.last_step.num_prefill_tokens else "decode"].append(core.last_step)
    step_figures = {kind: step_figures_of(stats) for kind, stats in steps.items()}
    in_steps = sum(stat.seconds for stats in steps.values() for stat in stats)
    # the run's time outside step() (the final drain of the device included): where steps explain a gap, it is ~0
    return {
        **throughput(generated, elapsed.seconds),
        "steps": step_figures,
        "outside_steps_s": elapsed.seconds - in_steps,
    }


def step_figures_of(stats: list) -> dict:
    """A kind of step's count, mean, median and slowest (ms), its share blocked for the device's results, its mean
    time in each phase (ms: scheduling, launching, reading) and on the stepping thread's CPU: the slowest step
    tells a one-off (a compile, an allocation) from a step that is slow every time."""
    times = sorted(1000 * stat.seconds for stat in stats) or [0.0]
    means = step_means(stats)
    return {
        "count": len(stats),
        "median_ms": times[len(times) // 2],
        "max_ms": times[-1],
        "device_wait_share": means["device_wait_mean_ms"] / max(1e-6, means["mean_ms"]),
        **means,
    }


@torch.inference_mode()
@transformers_own_rotation()  # baselines run transformers' own code, also after an engine ran in this process
def run_static(model, requests: list[Request], batch_size: int) -> dict:
    """HF `generate`, greedy, on left-padded batches of `batch_size` in order, one after another."""
    device = next(model.parameters()).device
    with timed(device) as elapsed:
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            input_ids, attention_mask = left_padded(batch)
            longest = max(r.max_new_tokens for r in batch)
            model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
    return throughput(sum(r.max_new_tokens for r in requests), elapsed.seconds)


def continuous_batching_config(max_seqs: int, max_batched_tokens: int, kv_bytes: int, kv_bytes_per_token: int):
    """transformers' ContinuousBatchingConfig held to the engine's limits (running sequences, tokens per
    step, KV memory) and with prefix sharing off, as the engine's runs start with no cached prefixes.
    Fields this transformers release lacks are left out; returns (config or None, the settings applied)."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        return None, {}
    page_size = 256
    wanted = {
        "page_size": page_size,
        "num_blocks": kv_bytes // (page_size * kv_bytes_per_token),
        "max_batch_tokens": max_batched_tokens,
        "max_requests_per_batch": max_seqs,
        "allow_block_sharing": False,
    }
    known = {field.name for field in dataclasses.fields(ContinuousBatchingConfig)}
    if "page_size" not in known:  # releases before 5.17 count the KV cache in blocks of block_size tokens
        wanted["block_size"] = wanted.pop("page_size")
    applied = {name: value for name, value in wanted.items() if name in known}
    return ContinuousBatchingConfig(**applied), applied


@transformers_own_rotation()
def run_continuous(model, requests: list[Request], cb_config) -> dict:
    """`generate_batch` twice on the same requests: the first call includes its start-up (cache
    allocation, warm-up, CUDA graph capture); the second reuses the warmed-up manager where this
    release can keep one (`persistent_manager`), so it measures serving alone."""
    longest = max(r.max_new_tokens for r in requests)
    generation = GenerationConfig(max_new_tokens=longest, do_sample=False, eos_token_id=None, pad_token_id=0)
    accepted = inspect.signature(model.generate_batch).parameters
    options = {"progress_bar": False}
    if cb_config is not None and "continuous_batching_config" in accepted:
        options["continuous_batching_config"] = cb_config
    keeps_manager = "persistent_manager" in accepted and hasattr(model, "destroy_cached_continuous_batching_manager")
    if keeps_manager:
        options["persistent_manager"] = True
    # it warns on every call that a kept manager is sized for its first workload: here both are the same
    logging.getLogger(CB_LOGGER).setLevel(logging.ERROR)
    prompts = [list(r.prompt) for r in requests]
    device = next(model.parameters()).device
    calls = []
    try:
        for _ in range(2):
            with timed(device) as elapsed:
                outputs = model.generate_batch(inputs=prompts, generation_config=generation, **options)
            generated = sum(len(output.generated_tokens) for output in outputs.values())
            if len(outputs) != len(requests) or generated != sum(r.max_new_tokens for r in requests):
                raise RuntimeError(f"generate_batch returned {len(outputs)} requests and {generated} tokens")
            calls.append(throughput(generated, elapsed.seconds))
    finally:
        if keeps_manager:
            model.destroy_cached_continuous_batching_manager()
    first, warm = calls
    start_up = first["seconds"] - warm["seconds"]
    return {**warm, "first_call": first, "start_up_s": start_up, "reused_manager": keeps_manager}
