"""paged_decode.py's attention as a Triton kernel, for CUDA.

One program per (row, KV head) walks the row's blocks one at a time, loads each block's keys and values
straight from the pool, and keeps an online softmax for the query heads that share the KV head, in
float32 whatever the pool's dtype. Its shapes never depend on the step's contexts, so it is captured in
CUDA graphs as it is. Tests hold it to paged_decode.py's torch twin through Triton's CPU interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    query_ptr,
    key_ptr,
    value_ptr,
    table_ptr,
    context_ptr,
    scale,
    window,
    query_row_stride,
    query_head_stride,
    out_row_stride,
    out_head_stride,
    kv_slot_stride,
    kv_head_stride,
    table_row_stride,
    table_col_stride,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_TILE: tl.constexpr,  # GROUP rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    DIM_TILE: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    BLOCK_SIZE: tl.constexpr,  # tokens per pool block
    TOKEN_TILE: tl.constexpr,  # BLOCK_SIZE rounded up to a power of two
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(context_ptr + row)
    group = tl.arange(0, GROUP_TILE)
    dims = tl.arange(0, DIM_TILE)
    tokens = tl.arange(0, TOKEN_TILE)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    dim_ok = dims < HEAD_DIM
    query_mask = head_ok[:, None] & dim_ok[None, :]
    query_at = query_ptr + row * query_row_stride + heads[:, None] * query_head_stride + dims[None, :]
    query = tl.load(query_at, mask=query_mask, other=0.0).to(tl.float32) * scale  # [G, D]

    first = tl.where(window > 0, tl.maximum(context - window, 0), 0)
    running_max = tl.full([GROUP_TILE], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([GROUP_TILE], dtype=tl.float32)
    acc = tl.zeros([GROUP_TILE, DIM_TILE], dtype=tl.float32)
    for logical in range(first // BLOCK_SIZE, tl.cdiv(context, BLOCK_SIZE)):
        block = tl.load(table_ptr + row * table_row_stride + logical * table_col_stride).to(tl.int64)
        positions = logical * BLOCK_SIZE + tokens
        visible = (tokens < BLOCK_SIZE) & (positions >= first) & (positions < context)
        slots = block * BLOCK_SIZE + tokens
        kv_at = slots[:, None] * kv_slot_stride + kv_head * kv_head_stride + dims[None, :]
        kv_mask = visible[:, None] & dim_ok[None, :]
        keys = tl.load(key_ptr + kv_at, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D]
        scores = tl.sum(query[:, None, :] * keys[None, :, :], axis=2)  # [G, T]
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_max[:, None])
        rescale = tl.exp(running_max - new_max)
        values = tl.load(value_ptr + kv_at, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D]
        acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        running_max = new_max
    out = acc / running_sum[:, None]
    out_at = out_ptr + row * out_row_stride + heads[:, None] * out_head_stride + dims[None, :]
    tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=query_mask)


def paged_decode_triton(
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
    """Write the attention of every row of `queries` into `out` (same shape) and return it."""
    rows, heads, head_dim = queries.shape
    kv_heads = keys.shape[1]
    if queries.stride(2) != 1 or out.stride(2) != 1 or keys.stride(2) != 1 or values.stride() != keys.stride():
        raise ValueError("paged_decode needs the head dimension contiguous and keys and values laid out alike")
    _paged_decode_kernel[(rows, kv_heads)](
        out,
        queries,
        keys,
        values,
        tables,
        context,
        scale,
        sliding_window or 0,
        queries.stride(0),
        queries.stride(1),
        out.stride(0),
        out.stride(1),
        keys.stride(0),
        keys.stride(1),
        tables.stride(0),
        tables.stride(1),
        GROUP=heads // kv_heads,
        GROUP_TILE=triton.next_power_of_2(heads // kv_heads),
        HEAD_DIM=head_dim,
        DIM_TILE=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        TOKEN_TILE=triton.next_power_of_2(block_size),
    )
    return out
