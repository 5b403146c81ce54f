"""How far the engine's decode step is from the memory floor at several batch sizes.

A decode step must read every weight once (the input embedding only at the batch's rows) and every
running sequence's cached K/V; at the device's bandwidth that is a lower bound on the step's time,
whatever the kernels. The bandwidth is the one measured in the same run (device_timing.copy_bandwidth).
"""

from __future__ import annotations

import gc
import random
import statistics
from collections.abc import Callable
from dataclasses import replace

import torch

from bench.device_timing import timed
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.kv_cache import KVCache, stage_block_tables
from server.engine.paged_decode import DecodeKernel, decode_kernel
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from server.engine.transfers import StepUpload

PREFILL_SLACK = 64  # tokens the first sequences may decode while the last ones are still prefilling


def kv_bytes_per_token(config, element_size: int) -> int:
    """Keys and values of one token over all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element_size


def weight_bytes_read(model, batch: int) -> int:
    """Bytes of weights one decode step of `batch` rows reads: all of them, except that an untied input
    embedding is only gathered at the batch's rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() == embedding.data_ptr():
        return total
    row_bytes = embedding.shape[1] * embedding.element_size()
    return total - embedding.numel() * embedding.element_size() + batch * row_bytes


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [1] + [rng.randrange(3, vocab) for _ in range(length - 1)]


def decoding_core(
    model, batch: int, context: int, steps: int, engine_config: EngineConfig, seed: int = 0, room: int = 0
) -> tuple[EngineCore, list[Sequence]]:
    """An engine whose `batch` sequences of `context` prompt tokens all decode together, with room for
    `steps` more decode steps, and for `room` more sequences beside them; two untimed steps are taken already."""
    gc.collect()  # the last batch size's KV pool must be gone before this one allocates its own
    core = EngineCore(model, replace(engine_config, max_num_seqs=batch + room), eos_token_ids=set())
    rng = random.Random(seed)
    sampling = SamplingParams(max_new_tokens=steps + PREFILL_SLACK, ignore_eos=True)
    vocab = model.config.vocab_size
    sequences = [Sequence(f"s{i}", random_prompt(rng, context, vocab), sampling) for i in range(batch)]
    for sequence in sequences:
        core.add(sequence)
    while not _full_decode_step(core, batch):
        if not core.has_work():
            raise RuntimeError(f"the sequences finished before all {batch} were decoding together")
        core.step()
    for _ in range(2):
        core.step()
    return core, sequences


def decode_step(model, batch: int, context: int, steps: int, engine_config: EngineConfig, seed: int = 0) -> dict:
    """The time of an engine step that decodes `batch` sequences with ~`context` tokens each, after every
    prompt is prefilled and two untimed decode steps: `steps` steps in a row timed as one (with async
    scheduling a step's host work overlaps the last one's device work, so steps are not timed apart),
    then as many with the model's forward timed alone (synchronized, so without that overlap)."""
    core, sequences = decoding_core(model, batch, context, 2 * steps, engine_config, seed)
    device = next(model.parameters()).device
    contexts = []
    with timed(device) as elapsed:
        for _ in range(steps):
            contexts.append(statistics.mean(len(s.token_ids) for s in sequences))
            core.step()
            _check_full_decode_step(core, batch)
    forward_times = []
    forward = core.runner.forward

    def timed_forward(*args):
        with timed(device) as forward_elapsed:
            result = forward(*args)
        forward_times.append(forward_elapsed.seconds)
        return result

    core.runner.forward = timed_forward
    for _ in range(steps):
        core.step()
        _check_full_decode_step(core, batch)
    return {
        "seqs": batch,
        "step_ms": 1000 * elapsed.seconds / steps,
        "forward_ms": 1000 * statistics.median(forward_times),  # the model alone, synchronized
        "attention_ms": attention_ms(core, sequences, steps),
        "mean_context": statistics.mean(contexts),
        "async_scheduling": core.async_scheduling,
    }


def attention_ms(
    core: EngineCore, sequences: list[Sequence], repeats: int, kernel: DecodeKernel | None = None
) -> float:
    """Median time of the paged decode kernel (the device's, or `kernel`) over every layer of the engine's
    pool, for the sequences as they stand (one query each, random): the attention share of a decode step."""
    kv = core.kv
    kernel = kernel or decode_kernel(kv.keys.device.type)
    queries, *args = attention_inputs(core, sequences)
    out = torch.empty_like(queries)
    return per_layer_ms(kv, repeats, lambda layer: kernel(out, queries, kv.keys[layer], kv.values[layer], *args))


def per_layer_ms(kv: KVCache, repeats: int, call: Callable[[int], object]) -> float:
    """Median time of `call(layer)` over every layer of the pool, `repeats` times."""
    times = []
    for _ in range(repeats):
        with timed(kv.keys.device) as elapsed:
            for layer in range(kv.layout.num_layers):
                call(layer)
        times.append(elapsed.seconds)
    return 1000 * statistics.median(times)


def attention_inputs(core: EngineCore, sequences: list[Sequence]) -> tuple:
    """(queries, block tables, contexts, block size, scale) of a decode kernel call over the sequences'
    cached positions, the queries random."""
    kv, device = core.kv, core.kv.keys.device
    upload = StepUpload(device)
    width = max(len(s.block_table) for s in sequences)
    tables = stage_block_tables(upload, [s.block_table for s in sequences], width, kv.pad_block)
    context = upload.stage([len(s.token_ids) - 1 for s in sequences])  # their cached positions
    upload.send()
    heads = core.runner.model.config.num_attention_heads
    queries = torch.randn(len(sequences), heads, kv.layout.head_dim, device=device, dtype=kv.layout.dtype)
    return queries, tables, context, kv.block_size, kv.layout.head_dim**-0.5


def _full_decode_step(core: EngineCore, batch: int) -> bool:
    last = core.last_step
    return last is not None and last.num_prefill_tokens == 0 and last.num_seqs == batch


def _check_full_decode_step(core: EngineCore, batch: int) -> None:
    if not _full_decode_step(core, batch):
        raise RuntimeError(f"a timed step was not a decode step of {batch} sequences: {core.last_step}")


def with_floor(model, measured: dict, gb_per_s: float) -> dict:
    """The measured step next to its memory floor at `gb_per_s`."""
    parameter = next(model.parameters())
    kv_read = measured["seqs"] * measured["mean_context"] * kv_bytes_per_token(model.config, parameter.element_size())
    floor_bytes = weight_bytes_read(model, measured["seqs"]) + kv_read
    floor_ms = 1000 * floor_bytes / (gb_per_s * 1e9)
    over = measured["step_ms"] / floor_ms
    return {**measured, "floor_bytes": int(floor_bytes), "floor_ms": floor_ms, "over_floor": over}
