"""paged_decode.py's attention as a Triton kernel, for CUDA.

One program per (row, KV head) walks the row's positions 64 at a time, loads their keys and values
straight from the pool through the block table, and keeps an online softmax for the query heads that
share the KV head (padded to tl.dot's 16 rows), accumulating in float32 (paged_triton.py's pieces; with
a 16-bit pool both products run at tf32, which holds its keys and values exactly). Its shapes never
depend on the step's contexts, so it is captured in CUDA graphs as it is. Tests hold it to
paged_decode.py's torch twin through Triton's CPU interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from server.engine.paged_triton import (
    MIN_DOT,
    RUNTIME_INTEGERS,
    KernelCall,
    launching,
    load_kv_tile,
    online_softmax_step,
    pool_strides,
)


@dataclass(frozen=True)
class Launch:
    """How the kernel runs: positions per iteration (enough bytes in flight per program to keep HBM busy)
    and Triton's warps per program and software-pipeline stages. bench/gpu.py's `kernel` part times
    others on the device at hand: on an H200 (run E) two stages instead of three took 9% off the kernel at
    256 rows of ~270 tokens and 3% at 64 rows of ~2,070, equal at 16 rows, with the same output bits."""

    tile: int = 64
    num_warps: int = 4
    num_stages: int = 2


@triton.jit(do_not_specialize=RUNTIME_INTEGERS)
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
    GROUP_TILE: tl.constexpr,  # GROUP rounded up to a power of two, at least MIN_DOT
    HEAD_DIM: tl.constexpr,
    DIM_TILE: tl.constexpr,  # HEAD_DIM rounded up likewise
    BLOCK_SIZE: tl.constexpr,  # tokens per pool block
    TILE: tl.constexpr,  # positions per iteration
    PRECISION: tl.constexpr,  # tl.dot's: "tf32" is exact for 16-bit pools, "ieee" keeps float32 ones exact
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(context_ptr + row)
    group = tl.arange(0, GROUP_TILE)
    dims = tl.arange(0, DIM_TILE)
    offsets = tl.arange(0, TILE)
    heads = kv_head * GROUP + group
    dim_ok = dims < HEAD_DIM
    query_mask = (group < GROUP)[:, None] & dim_ok[None, :]
    query_at = query_ptr + row * query_row_stride + heads[:, None] * query_head_stride + dims[None, :]
    query = tl.load(query_at, mask=query_mask, other=0.0).to(tl.float32)  # [G, D], padded heads are zeros

    first = tl.where(window > 0, tl.maximum(context - window, 0), 0)
    running_max = tl.full([GROUP_TILE], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([GROUP_TILE], dtype=tl.float32)
    acc = tl.zeros([GROUP_TILE, DIM_TILE], dtype=tl.float32)
    for tile in range(first, context, TILE):
        positions = tile + offsets
        visible = positions < context
        table_at = table_ptr + row * table_row_stride
        keys, values = load_kv_tile(
            key_ptr, value_ptr, table_at, positions, visible, kv_head, dims, dim_ok, kv_slot_stride, kv_head_stride,
            table_col_stride, BLOCK_SIZE, True,
        )  # fmt: skip
        running_max, running_sum, acc = online_softmax_step(
            query, keys, values, visible[None, :], scale, running_max, running_sum, acc, PRECISION
        )
    out = acc / running_sum[:, None]
    out_at = out_ptr + row * out_row_stride + heads[:, None] * out_head_stride + dims[None, :]
    tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=query_mask)


def decode_call(
    out: Tensor,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    tables: Tensor,
    context: Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    launch: Launch = Launch(),
) -> KernelCall:
    """The kernel's launch for paged_decode.py's arguments; `paged_decode_triton` runs it."""
    rows, heads, head_dim = queries.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    strides = pool_strides(queries, out, keys, values, tables)
    constexprs = {
        "GROUP": group,
        "GROUP_TILE": max(MIN_DOT, triton.next_power_of_2(group)),
        "HEAD_DIM": head_dim,
        "DIM_TILE": max(MIN_DOT, triton.next_power_of_2(head_dim)),
        "BLOCK_SIZE": block_size,
        "TILE": launch.tile,
        "PRECISION": "ieee" if keys.dtype == torch.float32 else "tf32",
    }
    args = (out, queries, keys, values, tables, context, scale, sliding_window or 0, *strides)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    return KernelCall(_paged_decode_kernel, (rows, kv_heads), args, constexprs, options)


paged_decode_triton = launching(decode_call)  # paged_decode.py's contract
