"""paged_decode.py's attention as a Triton kernel, for CUDA.

One program per (row, KV head) walks the row's positions 64 at a time, loads their keys and values
straight from the pool through the block table, and keeps an online softmax for the query heads that
share the KV head (padded to tl.dot's 16 rows), accumulating in float32; as in flash attention, the
softmax weights meet the values in the pool's dtype. Its shapes never depend on the step's contexts, so
it is captured in CUDA graphs as it is. Tests hold it to paged_decode.py's torch twin through Triton's
CPU interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

MIN_DOT = 16  # tl.dot's smallest operand side


@dataclass(frozen=True)
class Launch:
    """How the kernel runs: positions per iteration (enough bytes in flight per program to keep HBM busy)
    and Triton's warps per program and software-pipeline stages. bench/gpu.py's `kernel` part times
    others on the device at hand."""

    tile: int = 64
    num_warps: int = 4
    num_stages: int = 3


# Triton compiles a variant per divisibility (by 16, or == 1) of each integer argument: these vary from
# step to step, and each new variant would stall a step for a compile
RUNTIME_INTEGERS = ["window", "query_row_stride", "query_head_stride", "out_row_stride", "out_head_stride"]
RUNTIME_INTEGERS += ["table_row_stride", "table_col_stride"]


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
        block = tl.load(table_ptr + row * table_row_stride + (positions // BLOCK_SIZE) * table_col_stride, mask=visible)
        slots = block.to(tl.int64) * BLOCK_SIZE + positions % BLOCK_SIZE
        kv_at = slots[:, None] * kv_slot_stride + kv_head * kv_head_stride + dims[None, :]
        kv_mask = visible[:, None] & dim_ok[None, :]
        keys = tl.load(key_ptr + kv_at, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D]
        values = tl.load(value_ptr + kv_at, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(query, tl.trans(keys), input_precision=PRECISION) * scale  # [G, T], float32
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))  # finite: every tile sees a position
        weights = tl.exp(scores - new_max[:, None])
        rescale = tl.exp(running_max - new_max)
        acc = acc * rescale[:, None] + tl.dot(weights, values, input_precision=PRECISION)
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
    launch: Launch = Launch(),
) -> Tensor:
    """paged_decode.py's contract: the attention of every row of `queries`, written into `out`."""
    rows, heads, head_dim = queries.shape
    kv_heads = keys.shape[1]
    if queries.stride(2) != 1 or out.stride(2) != 1 or keys.stride(2) != 1 or values.stride() != keys.stride():
        raise ValueError("paged_decode needs the head dimension contiguous and keys and values laid out alike")
    group = heads // kv_heads
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
        GROUP=group,
        GROUP_TILE=max(MIN_DOT, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        DIM_TILE=max(MIN_DOT, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        TILE=launch.tile,
        PRECISION="ieee" if keys.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    return out
