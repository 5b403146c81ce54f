"""Prefill attention over the paged KV pool, read in place.

A prefill chunk is `length` query tokens of one sequence from absolute position `start` on, whose keys
and values are already in the pool with the sequence's earlier ones. Query token i attends over positions
0..start+i of its own sequence (the last `sliding_window` of them, if set), found through the sequence's
block table: no gathered copy of the context, no padding to the longest chunk, no repeated KV heads.

The step's chunks are cut into tiles of at most `QUERY_TILE` tokens (`prefill_tiles`): the unit of work
of the Triton kernel (paged_prefill_triton.py), which `prefill_kernel` picks on CUDA. Elsewhere it picks
`paged_prefill_reference`: every query token as a decode row of paged_decode.py's torch twin, whose
context ends at the token. Slow, but it runs the paged backend's prefill on CPU in the tests, and the
kernel is held to it.
Shapes: queries and out [T, heads, D] of the step (only the tiles' rows are written); keys and values
[slots, KV heads, D] of a layer; tables [chunks, width], any strides; tiles [n, TILE_FIELDS].
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from server.engine.paged_decode import paged_decode_reference

QUERY_TILE = 16  # query tokens per tile
TILE_FIELDS = 4  # per tile: first query row in the step, its tokens, the first one's position, its block-table row

# (out, queries, keys, values, tables, tiles, query_tile, block_size, scale, sliding_window) -> out
PrefillKernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, int, float, int | None], Tensor]


def prefill_tiles(chunks: list[tuple[int, int, int]], query_tile: int = QUERY_TILE) -> np.ndarray:
    """(first row, length, start) of each chunk, in block-table order -> [tiles, TILE_FIELDS] int64."""
    tiles = [
        (row + offset, min(query_tile, length - offset), start + offset, index)
        for index, (row, length, start) in enumerate(chunks)
        for offset in range(0, length, query_tile)
    ]
    return np.array(tiles, dtype=np.int64).reshape(-1, TILE_FIELDS)


def paged_prefill_reference(
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
) -> Tensor:
    for first_row, count, first_pos, table_row in tiles.tolist():
        rows = slice(first_row, first_row + count)
        context = torch.arange(first_pos + 1, first_pos + count + 1, device=tables.device)
        token_tables = tables[table_row].expand(count, -1)
        paged_decode_reference(
            out[rows], queries[rows], keys, values, token_tables, context, block_size, scale, sliding_window
        )
    return out


@functools.cache
def prefill_kernel(device_type: str) -> PrefillKernel:
    if device_type == "cuda":
        from server.engine.paged_prefill_triton import paged_prefill_triton  # Triton ships with CUDA builds of torch

        return paged_prefill_triton
    return paged_prefill_reference
