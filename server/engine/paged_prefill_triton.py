"""paged_prefill.py's attention as a Triton kernel, for CUDA.

One program per (tile, KV head) walks the keys of the tile's sequence up to its last token's position,
for all the tile's tokens and all the query heads that share the KV head at once (tokens x group rows in
each tl.dot), loading keys and values straight from the pool through the block table, with
paged_triton.py's pieces. Unlike the decode kernel, whose tiles are small, it multiplies in the pool's
dtype, as flash attention does: with a 16-bit pool, query-key products are exact and summed in float32,
and the softmax weights are rounded to the pool's dtype before they meet the values (the decode kernel
keeps them at tf32). That takes fewer registers (143 instead of 168 on sm_90) and twice the tensor-core
rate, which long prompts need: their attention grows with the square of the chunk. Tests hold it to
paged_prefill.py's torch twin through Triton's CPU interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl
from torch import Tensor

from server.engine.paged_prefill import TILE_FIELDS
from server.engine.paged_triton import (
    MIN_DOT,
    RUNTIME_INTEGERS,
    KernelCall,
    launching,
    load_kv_tile,
    online_softmax_step,
    pool_strides,
)

FIELDS = tl.constexpr(TILE_FIELDS)  # a jitted function reads only constexpr globals
EXACT = tl.constexpr("ieee")  # tl.dot's precision for float32 pools; 16-bit operands multiply exactly anyway


@dataclass(frozen=True)
class PrefillLaunch:
    """Key positions per iteration, Triton's warps per program and software-pipeline stages."""

    key_tile: int = 64
    num_warps: int = 4
    num_stages: int = 2


@triton.jit(do_not_specialize=RUNTIME_INTEGERS)
def _paged_prefill_kernel(
    out_ptr,
    query_ptr,
    key_ptr,
    value_ptr,
    table_ptr,
    tile_ptr,
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
    QUERY_TILE: tl.constexpr,  # at least the tiles' tokens (QUERY_TILE * GROUP_TILE >= MIN_DOT, a power of two)
    HEAD_DIM: tl.constexpr,
    DIM_TILE: tl.constexpr,  # HEAD_DIM rounded up to a power of two, at least 16
    BLOCK_SIZE: tl.constexpr,  # tokens per pool block
    KEY_TILE: tl.constexpr,  # key positions per iteration
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    first_row = tl.load(tile_ptr + tile * FIELDS)
    count = tl.load(tile_ptr + tile * FIELDS + 1)
    first_pos = tl.load(tile_ptr + tile * FIELDS + 2)
    table_row = tl.load(tile_ptr + tile * FIELDS + 3)

    # row m of each dot: query token m // GROUP_TILE of the tile, query head m % GROUP_TILE of the KV head's group
    rows = tl.arange(0, QUERY_TILE * GROUP_TILE)
    token = rows // GROUP_TILE
    member = rows % GROUP_TILE
    row_ok = (token < count) & (member < GROUP)
    heads = kv_head * GROUP + member
    query_pos = first_pos + token
    dims = tl.arange(0, DIM_TILE)
    dim_ok = dims < HEAD_DIM
    query_mask = row_ok[:, None] & dim_ok[None, :]
    query_rows = (first_row + token).to(tl.int64)
    query_at = query_ptr + query_rows[:, None] * query_row_stride + heads[:, None] * query_head_stride + dims[None, :]
    query = tl.load(query_at, mask=query_mask, other=0.0).to(key_ptr.dtype.element_ty)  # [M, D], padding zeros

    end = first_pos + count  # keys the tile's last token sees
    first = tl.where(window > 0, tl.maximum(first_pos - window + 1, 0), 0)
    offsets = tl.arange(0, KEY_TILE)
    running_max = tl.full([QUERY_TILE * GROUP_TILE], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([QUERY_TILE * GROUP_TILE], dtype=tl.float32)
    acc = tl.zeros([QUERY_TILE * GROUP_TILE, DIM_TILE], dtype=tl.float32)
    for key_tile in range(first, end, KEY_TILE):
        positions = key_tile + offsets
        in_context = positions < end
        table_at = table_ptr + table_row * table_row_stride
        keys, values = load_kv_tile(
            key_ptr, value_ptr, table_at, positions, in_context, kv_head, dims, dim_ok, kv_slot_stride, kv_head_stride,
            table_col_stride, BLOCK_SIZE, False,
        )  # fmt: skip
        visible = in_context[None, :] & (positions[None, :] <= query_pos[:, None])
        visible &= (window <= 0) | (positions[None, :] > query_pos[:, None] - window)
        running_max, running_sum, acc = online_softmax_step(
            query, keys, values, visible, scale, running_max, running_sum, acc, EXACT
        )
    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]  # every stored row saw its own position
    out_at = out_ptr + query_rows[:, None] * out_row_stride + heads[:, None] * out_head_stride + dims[None, :]
    tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=query_mask)


def prefill_call(
    out: Tensor,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    tables: Tensor,
    tiles: Tensor,
    query_tile: int,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    launch: PrefillLaunch = PrefillLaunch(),
) -> KernelCall:
    """The kernel's launch for paged_prefill.py's arguments; `paged_prefill_triton` runs it."""
    heads, head_dim = queries.shape[1:]
    kv_heads = keys.shape[1]
    strides = pool_strides(queries, out, keys, values, tables)
    if query_tile & (query_tile - 1) or not tiles.is_contiguous():
        raise ValueError("paged prefill needs contiguous tiles of a power-of-two number of tokens")
    group = heads // kv_heads
    group_tile = triton.next_power_of_2(group)
    constexprs = {
        "GROUP": group,
        "GROUP_TILE": group_tile,
        "QUERY_TILE": max(query_tile, MIN_DOT // min(group_tile, MIN_DOT)),
        "HEAD_DIM": head_dim,
        "DIM_TILE": max(MIN_DOT, triton.next_power_of_2(head_dim)),
        "BLOCK_SIZE": block_size,
        "KEY_TILE": launch.key_tile,
    }
    args = (out, queries, keys, values, tables, tiles, scale, sliding_window or 0, *strides)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    return KernelCall(_paged_prefill_kernel, (tiles.shape[0], kv_heads), args, constexprs, options)


paged_prefill_triton = launching(prefill_call)  # paged_prefill.py's contract
