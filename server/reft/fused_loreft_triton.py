"""The kernel behind fused_loreft.py: one program per edited row applies LoReFT in place, rounding where
interventions.loreft rounds.

Row t of segment s at layer position j: h <- round(h + (round(W h + b) - h R') R'^T), with R' [d, r] in
float32, W [r, d] and b [r] in the model's dtype. As in the torch formula, `W h + b` is rounded to the model's
dtype once (a GEMM with its bias accumulates in float32 and rounds its output), the rest is float32 and the
sum is rounded once at the end. Only the order of the float32 sums differs from cuBLAS's, so the result may
differ from the torch formula in the last bit, never more.

The program walks the hidden size in tiles twice: first the 2r dot products, then the update, so a row's
registers hold one tile of d at a time whatever the model's width.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

D_TILE_MAX = 1024

# what changes with a step: Triton would compile a variant per divisibility of each (by 16, or == 1)
STEP_INTEGERS = ["segment_length", "segments", "layer_index"]


@triton.jit(do_not_specialize=STEP_INTEGERS)
def _loreft_kernel(
    hidden,  # [T, d], rows contiguous
    rows,  # [N] the step rows to edit
    positions,  # [N] each row's place in the segments laid end to end: segment = position // segment_length
    rotation,  # [layers, S, d, r] float32, contiguous
    weight,  # [layers, S, r, d], contiguous
    bias,  # [layers, S, 1, r], contiguous
    hidden_row_stride,
    segment_length,
    segments,
    layer_index,
    D: tl.constexpr,
    R: tl.constexpr,
    D_TILE: tl.constexpr,
    R_TILE: tl.constexpr,
):
    program = tl.program_id(0)
    row = tl.load(rows + program)
    segment = layer_index * segments + tl.load(positions + program) // segment_length
    h_at = hidden + row * hidden_row_stride
    rotation_at = rotation + segment.to(tl.int64) * D * R
    weight_at = weight + segment.to(tl.int64) * R * D
    ranks = tl.arange(0, R_TILE)
    rank_ok = ranks < R
    rotated = tl.zeros([R_TILE], dtype=tl.float32)
    linear = tl.zeros([R_TILE], dtype=tl.float32)
    for start in range(0, D, D_TILE):
        dims = start + tl.arange(0, D_TILE)
        tile_ok = (dims < D)[:, None] & rank_ok[None, :]
        h = tl.load(h_at + dims, mask=dims < D, other=0.0).to(tl.float32)[:, None]
        r = tl.load(rotation_at + dims[:, None] * R + ranks[None, :], mask=tile_ok, other=0.0)
        w = tl.load(weight_at + ranks[None, :] * D + dims[:, None], mask=tile_ok, other=0.0).to(tl.float32)
        rotated += tl.sum(h * r, axis=0)
        linear += tl.sum(h * w, axis=0)
    b = tl.load(bias + segment.to(tl.int64) * R + ranks, mask=rank_ok, other=0.0).to(tl.float32)
    source = (linear + b).to(hidden.dtype.element_ty).to(tl.float32)  # W h + b in the model's dtype
    delta = source - rotated
    for start in range(0, D, D_TILE):
        dims = start + tl.arange(0, D_TILE)
        tile_ok = (dims < D)[:, None] & rank_ok[None, :]
        h = tl.load(h_at + dims, mask=dims < D, other=0.0).to(tl.float32)
        r = tl.load(rotation_at + dims[:, None] * R + ranks[None, :], mask=tile_ok, other=0.0)
        edited = h + tl.sum(r * delta[None, :], axis=1)
        tl.store(h_at + dims, edited.to(hidden.dtype.element_ty), mask=dims < D)


def loreft_launch(
    hidden: Tensor,
    rows: Tensor,
    positions: Tensor,
    segment_length: int,
    params: dict[str, Tensor],
    layer_index: int,
) -> tuple:
    """(kernel, grid, args, constexprs, options) of the launch that edits `hidden`'s `rows` in place with the
    LoReFT parameters stacked [layers, S, ...] (`params`), at layer position `layer_index`."""
    rotation, weight, bias = params["rotation"], params["weight"], params["bias"]
    _, segments, d, r = rotation.shape
    args = (hidden, rows, positions, rotation, weight, bias, hidden.stride(0), segment_length, segments, layer_index)
    constexprs = {
        "D": d,
        "R": r,
        "D_TILE": min(D_TILE_MAX, triton.next_power_of_2(d)),
        "R_TILE": triton.next_power_of_2(r),
    }
    return _loreft_kernel, (rows.shape[0],), args, constexprs, {"num_warps": 4}
