"""Paged attention with FlexAttention: every query of the step reads its own sequence's KV blocks in the
pool, in place, with no gathered copies and no padding to the longest context.

The step's queries stay packed as one row [1, H, T, D]; a layer's pool is viewed (not copied) as one long
KV sequence [1, KV heads, slots, D]. A BlockMask built once per step says which pool blocks each tile of
128 query rows may visit (the blocks of the sequences in that tile, limited to what their positions and
the sliding window can see), and its mask_mod keeps each row to its own sequence's slots at or before
its position. The mask_mod must be exact on its own: a tile of decode rows spans many sequences, and
the eager kernel (CPU) ignores the block list altogether.

Ownership test: a pool block has one logical index (its position in a block table), because blocks are
shared only through the prefix cache, whose blocks hold the same positions in every sequence that
takes them. So row r of sequence s may read block b iff `tables[s, logical[b]] == b`.

Kernels (the one GPU-only seam is `flex_kernel`): on CUDA, `torch.compile(flex_attention)`. On CPU the
eager kernel, which materialises scores over the whole pool (fine for tests, not for serving): torch
2.13's compiled CPU flex fails to build its C++ with dynamic shapes (CppCompileError in the generated
kernel), and with static shapes recompiles for every new step shape (~6 s each).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from server.engine.kv_cache import stage_block_tables
from server.engine.transfers import StepUpload, to_device

QUERY_TILE = 128  # rows per BlockMask tile: flex's own default sparse block size

FlexKernel = Callable[..., Tensor]


@functools.cache
def flex_kernel(device_type: str) -> FlexKernel:
    """The flex_attention to run on a device: compiled where torch can, eager elsewhere (see module doc)."""
    if device_type == "cuda":
        return torch.compile(flex_attention)
    # eager is the intended CPU path here, not an accident: silence flex's advice to compile
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)
    return flex_attention


def kernel_options(device_type: str, block_size: int) -> dict | None:
    """Triton's KV tile must divide the mask's KV block, which is one pool block (16 tokens by default)."""
    if device_type != "cuda":
        return None
    return {"BLOCK_N": math.gcd(block_size, 64)}


class FlexStep:
    """One step's FlexAttention metadata over a KV pool; `attend` runs one layer."""

    def __init__(self, spans, block_size: int, num_pool_blocks: int, upload: StepUpload, kernel: FlexKernel):
        """Stages the step's metadata in `upload`; attend only after it was sent."""
        self.spans = spans
        self.block_size = block_size
        self.num_rows = sum(s.length for s in spans)
        self.kernel = kernel
        self.options = kernel_options(upload.device.type, block_size)
        padded_rows = -(-self.num_rows // QUERY_TILE) * QUERY_TILE  # tile padding rows see nothing (position -1)
        row_seq, row_pos = [0] * padded_rows, [-1] * padded_rows
        for index, span in enumerate(spans):
            row_seq[span.row : span.row + span.length] = [index] * span.length
            row_pos[span.row : span.row + span.length] = range(span.start, span.start + span.length)
        width = max(len(s.block_table) for s in spans)
        self.row_seq = upload.stage(row_seq)
        self.row_pos = upload.stage(row_pos)
        self.tables = stage_block_tables(upload, [s.block_table for s in spans], width, -1)
        self._logical: Tensor | None = None
        self.num_pool_blocks = num_pool_blocks
        self.kv_len = num_pool_blocks * block_size
        self._masks: dict[int | None, BlockMask] = {}

    def block_mask(self, sliding_window: int | None) -> BlockMask:
        if sliding_window not in self._masks:
            self._masks[sliding_window] = BlockMask.from_kv_blocks(
                *self._visited_blocks(sliding_window),
                BLOCK_SIZE=(QUERY_TILE, self.block_size),
                mask_mod=self._mask_mod(sliding_window),
                seq_lengths=(self.num_rows, self.kv_len),
                compute_q_blocks=False,  # only the backward pass needs them
            )
        return self._masks[sliding_window]

    def _visited_blocks(self, sliding_window: int | None) -> tuple[Tensor, Tensor]:
        """Per query tile, how many pool blocks its rows may see and which, each once: [1, 1, tiles] and
        [1, 1, tiles, pool blocks]."""
        tiles: list[dict[int, None]] = [{} for _ in range(-(-self.num_rows // QUERY_TILE))]
        for span in self.spans:
            end = span.row + span.length
            for tile in range(span.row // QUERY_TILE, (end - 1) // QUERY_TILE + 1):
                first, last = max(span.row, tile * QUERY_TILE), min(end, (tile + 1) * QUERY_TILE) - 1
                newest = span.start + last - span.row  # the newest position a row of the span in this tile sees
                oldest = 0 if sliding_window is None else max(0, span.start + first - span.row - sliding_window + 1)
                blocks = span.block_table[oldest // self.block_size : newest // self.block_size + 1]
                tiles[tile].update(dict.fromkeys(blocks))  # shared prefix blocks appear once: no double counting
        # as wide as the pool, as torch's own paged attention has it: compiled kernels want the KV extent covered
        indices = np.zeros((1, 1, len(tiles), self.num_pool_blocks), dtype=np.int32)
        for tile, blocks in enumerate(tiles):
            indices[0, 0, tile, : len(blocks)] = list(blocks)
        counts = np.array([[[len(t) for t in tiles]]], dtype=np.int32)
        # made at a layer's first call, after the step's upload: copies that do not wait for the device
        device = self.row_seq.device
        return to_device(counts, torch.int32, device), to_device(indices, torch.int32, device)

    def logical(self) -> Tensor:
        """Each pool block's index in the block table that holds it, -1 where none does; made on first use,
        once the step's metadata is on the device."""
        if self._logical is None:
            tables, device = self.tables, self.tables.device
            # padding entries write to one spare slot past the pool, dropped: no data-dependent shape, no sync
            targets = torch.where(tables >= 0, tables, self.num_pool_blocks).flatten()
            index = torch.arange(tables.shape[1], device=device).expand_as(tables).flatten()
            logical = torch.full((self.num_pool_blocks + 1,), -1, dtype=torch.long, device=device)
            self._logical = logical.scatter_(0, targets, index)[:-1]
        return self._logical

    def _mask_mod(self, sliding_window: int | None):
        row_seq, row_pos, tables, logical = self.row_seq, self.row_pos, self.tables, self.logical()
        block_size = self.block_size  # fixed for the engine's life; a step-varying int would recompile the kernel

        def own_slot_in_view(batch, head, q_idx, kv_idx):
            block = kv_idx // block_size
            index = logical[block]
            owned = (index >= 0) & (tables[row_seq[q_idx], index.clamp(0, tables.shape[1] - 1)] == block)
            key_pos = index * block_size + kv_idx % block_size
            allowed = owned & (key_pos <= row_pos[q_idx])
            if sliding_window is not None:
                allowed = allowed & (key_pos > row_pos[q_idx] - sliding_window)
            return allowed

        return own_slot_in_view

    def attend(
        self, queries: Tensor, keys: Tensor, values: Tensor, scaling: float | None, sliding_window: int | None
    ) -> Tensor:
        """queries [T, H, D] of the step, keys/values [pool slots, KV, D] of a layer -> [T, H, D]."""
        q = queries.transpose(0, 1).unsqueeze(0)
        k = keys.transpose(0, 1).unsqueeze(0)  # a strided view of the pool
        v = values.transpose(0, 1).unsqueeze(0)
        out = self.kernel(
            q,
            k,
            v,
            block_mask=self.block_mask(sliding_window),
            scale=scaling,
            enable_gqa=q.shape[1] != k.shape[1],
            kernel_options=self.options,
        )
        return out[0].transpose(0, 1)
