"""The paged decode kernel under other launch configurations, and torch's paged flash attention, timed on
the device at hand.

bench/gpu.py's `kernel` part. With the engine's sequences decoding together as the `decode` part leaves
them, every launch of a small grid (positions per iteration, warps per program, pipeline stages) runs
over every layer of the pool; each gets its time, the KV bandwidth it reaches, and its largest
difference from the default launch's output. A launch clearly faster than the default on the GPUs that
serve becomes `paged_decode_triton.Launch`'s default.

The same rows also go through `torch.nn.attention.varlen.varlen_attn` with the pool's block table,
where the torch at hand has it: flash attention reading the pool in place, a candidate to replace the
Triton kernel (and the gathered prefill groups). Its page-size and version limits are unknown until it
runs on a GPU, so a failure is recorded, not raised. Triton and flash attention run on CUDA only: on a
CPU the part times the torch twin alone.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
from torch import Tensor

from bench.decode_floor import attention_inputs, attention_ms, kv_bytes_per_token, per_layer_ms
from server.engine.core import EngineCore
from server.engine.sequence import Sequence

GRID = {"tile": (32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (2, 3)}
SMOKE_GRID = {"tile": (32,), "num_warps": (2,), "num_stages": (2, 3)}  # the same code, a few compiles


def time_launches(core: EngineCore, sequences: list[Sequence], repeats: int, grid: dict = GRID) -> dict:
    """{"default": the kernel as the engine runs it, "launches": the grid's, "varlen": torch's paged flash
    attention's} with ms and GB/s of each."""
    per_token = kv_bytes_per_token(core.runner.model.config, core.kv.layout.dtype.itemsize)
    kv_read = sum(len(s.token_ids) - 1 for s in sequences) * per_token  # the cached positions, every layer

    def timing(kernel=None) -> dict:
        ms = attention_ms(core, sequences, repeats, kernel)
        return {"ms": ms, "gb_per_s": kv_read / ms / 1e6}

    result = {"kv_bytes": kv_read, "default": timing(), "launches": []}
    if core.kv.keys.device.type != "cuda":
        return result
    from server.engine.paged_decode_triton import Launch, paged_decode_triton

    queries, *args = attention_inputs(core, sequences)
    keys, values = core.kv.keys[0], core.kv.values[0]
    default = paged_decode_triton(torch.empty_like(queries), queries, keys, values, *args)

    def measured(kernel) -> dict:
        out = kernel(torch.empty_like(queries), queries, keys, values, *args)
        return {**timing(kernel), "max_difference": (out.float() - default.float()).abs().max().item()}

    for tile in grid["tile"]:
        for num_warps in grid["num_warps"]:
            for num_stages in grid["num_stages"]:
                launch = Launch(tile, num_warps, num_stages)
                result["launches"].append({**vars(launch), **measured(partial(paged_decode_triton, launch=launch))})
    try:
        result["varlen"] = time_varlen(core, queries, *args, default, repeats, kv_read)
    except Exception as e:  # not in this torch, or not for this pool's pages
        result["varlen"] = {"error": f"{type(e).__name__}: {e}"}
    return result


def time_varlen(
    core: EngineCore,
    queries: Tensor,
    tables: Tensor,
    context: Tensor,
    block_size: int,
    scale: float,
    default: Tensor,
    repeats: int,
    kv_read: int,
) -> dict:
    """The decode rows through torch's paged varlen flash attention: one query a row, causal from its last
    position, over the row's `context` tokens in the pool's pages (its inputs made once, as an engine would
    keep them). Its time over every layer, and its largest difference from `default` at layer 0."""
    from torch.nn.attention.varlen import varlen_attn

    rows, heads, head_dim = queries.shape
    kv_heads = core.kv.layout.num_kv_heads
    fixed = {
        "cu_seq_q": torch.arange(rows + 1, dtype=torch.int32, device=queries.device),
        "cu_seq_k": None,
        "max_q": 1,
        "max_k": int(context.max()),
        "scale": scale,
        "window_size": (-1, 0),  # causal; the benchmark model has no sliding window
        "enable_gqa": heads != kv_heads,
        "seqused_k": context.to(torch.int32),
        "block_table": tables.to(torch.int32),
    }

    accepted = inspect.signature(varlen_attn).parameters
    if missing := [name for name in ("seqused_k", "block_table") if name not in accepted]:
        raise TypeError(f"this torch's varlen_attn takes no {' or '.join(missing)}: it cannot read pages")
    if "enable_gqa" not in accepted:  # torch 2.11: flash attention takes fewer KV heads as they are
        del fixed["enable_gqa"]

    def pages(pool: Tensor) -> Tensor:
        return pool.view(-1, block_size, kv_heads, head_dim)

    def attend(layer: int) -> Tensor:
        return varlen_attn(queries, pages(core.kv.keys[layer]), pages(core.kv.values[layer]), **fixed)

    difference = (attend(0).float() - default.float()).abs().max().item()
    ms = per_layer_ms(core.kv, repeats, attend)
    return {"ms": ms, "gb_per_s": kv_read / ms / 1e6, "max_difference": difference}
