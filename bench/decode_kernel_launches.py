"""The paged decode kernel under other launch configurations, timed on the device at hand.

bench/gpu.py's `kernel` part. With the engine's sequences decoding together as the `decode` part leaves
them, every launch of a small grid (positions per iteration, warps per program, pipeline stages) runs
over every layer of the pool; each gets its time, the KV bandwidth it reaches, and its largest
difference from the default launch's output. A launch clearly faster than the default on the GPUs that
serve becomes `paged_decode_triton.Launch`'s default. Triton runs on CUDA only: on a CPU the part
times the torch twin alone.
"""

from __future__ import annotations

from functools import partial

import torch

from bench.decode_floor import attention_inputs, attention_ms, kv_bytes_per_token
from server.engine.core import EngineCore
from server.engine.sequence import Sequence

GRID = {"tile": (32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (2, 3)}


def time_launches(core: EngineCore, sequences: list[Sequence], repeats: int) -> dict:
    """{"default": the kernel as the engine runs it, "launches": the grid's} with ms and GB/s of each."""
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
    for tile in GRID["tile"]:
        for num_warps in GRID["num_warps"]:
            for num_stages in GRID["num_stages"]:
                launch = Launch(tile, num_warps, num_stages)
                kernel = partial(paged_decode_triton, launch=launch)
                out = kernel(torch.empty_like(queries), queries, keys, values, *args)
                difference = (out.float() - default.float()).abs().max().item()
                result["launches"].append({**vars(launch), **timing(kernel), "max_difference": difference})
    return result
