"""Decode attention over the paged KV pool, read in place.

A decode row is one query token. It attends over the first `context` positions of its own sequence,
found through the sequence's block table, with no gathered copy and no padding to the longest context.
Shapes: queries and out [rows, heads, D]; a layer's keys and values [slots, KV heads, D], where slot =
block * block_size + offset; tables [rows, width], any strides (a row's entries past
ceil(context / block_size) are never read); context [rows]. `sliding_window` keeps the last `window`
positions, as the SDPA path's mask does.

`decode_kernel` picks the implementation: on CUDA the Triton kernel (paged_decode_triton.py), elsewhere
`paged_decode_reference`, the same sum in plain torch ops, one row at a time. That twin is slow: it serves
the tests on CPU and is what the kernel is held to.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

# (out, queries, keys, values, tables, context, block_size, scale, sliding_window) -> out
DecodeKernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, float, int | None], Tensor]


def paged_decode_reference(
    out: Tensor,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    tables: Tensor,
    context: Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
) -> Tensor:
    heads, kv_heads = queries.shape[1], keys.shape[1]
    for row in range(queries.shape[0]):
        length = int(context[row])
        first = max(0, length - sliding_window) if sliding_window else 0
        positions = torch.arange(first, length, device=tables.device)
        slots = tables[row, positions // block_size].long() * block_size + positions % block_size
        k = keys[slots].float().repeat_interleave(heads // kv_heads, dim=1)  # [T, H, D]
        v = values[slots].float().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,thd->ht", queries[row].float() * scale, k)
        out[row] = torch.einsum("ht,thd->hd", scores.softmax(dim=-1), v).to(out.dtype)
    return out


@functools.cache
def decode_kernel(device_type: str) -> DecodeKernel:
    if device_type == "cuda":
        from server.engine.paged_decode_triton import paged_decode_triton  # Triton ships with CUDA builds of torch

        return paged_decode_triton
    return paged_decode_reference
