"""What the paged attention kernels (paged_decode_triton.py, paged_prefill_triton.py) share: the layout
checks and strides they are launched with, how a launch is spelled out (`KernelCall`, which tests also
compile ahead of time for the GPUs that serve, on machines without one), and two jitted pieces of their
loop: loading a tile of keys and values through a block table, and the online-softmax update.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import triton
import triton.language as tl
from torch import Tensor

MIN_DOT = 16  # tl.dot's smallest operand side

# Triton compiles a variant per divisibility (by 16, or == 1) of each integer argument: these vary from
# step to step, and each new variant would stall a step for a compile
RUNTIME_INTEGERS = ["window", "query_row_stride", "query_head_stride", "out_row_stride", "out_head_stride"]
RUNTIME_INTEGERS += ["table_row_stride", "table_col_stride"]


@dataclass(frozen=True)
class KernelCall:
    """One launch of a jitted kernel, spelled out: run it with `launch()`."""

    kernel: triton.runtime.JITFunction
    grid: tuple[int, ...]
    args: tuple  # the kernel's runtime arguments, in order
    constexprs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # num_warps, num_stages

    def launch(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


def launching(make_call: Callable[..., KernelCall]) -> Callable[..., Tensor]:
    """The attention function of a call builder: its arguments, `out` first; launches the call, returns `out`."""

    @functools.wraps(make_call)
    def attend(out: Tensor, *args, **kwargs) -> Tensor:
        make_call(out, *args, **kwargs).launch()
        return out

    attend.__signature__ = inspect.signature(make_call).replace(return_annotation=Tensor)
    return attend


def pool_strides(queries: Tensor, out: Tensor, keys: Tensor, values: Tensor, tables: Tensor) -> tuple[int, ...]:
    """The strides both kernels take, in their order, once the layouts they assume are checked."""
    if queries.stride(2) != 1 or out.stride(2) != 1 or keys.stride(2) != 1 or values.stride() != keys.stride():
        raise ValueError("paged attention needs the head dimension contiguous and keys and values laid out alike")
    strides = (queries.stride(0), queries.stride(1), out.stride(0), out.stride(1), keys.stride(0), keys.stride(1))
    return (*strides, tables.stride(0), tables.stride(1))


@triton.jit
def load_kv_tile(
    key_ptr,
    value_ptr,
    table_at,  # the sequence's row of block ids
    positions,  # [K] positions of the sequence
    in_context,  # [K] which of them to load (others read as zeros)
    kv_head,
    dims,
    dim_ok,
    kv_slot_stride,
    kv_head_stride,
    table_col_stride,
    BLOCK_SIZE: tl.constexpr,
    FLOAT32: tl.constexpr,  # converted to float32, or in the pool's dtype
):
    """Keys and values [K, D] of one KV head at the positions, straight from the pool."""
    block = tl.load(table_at + (positions // BLOCK_SIZE) * table_col_stride, mask=in_context)
    slots = block.to(tl.int64) * BLOCK_SIZE + positions % BLOCK_SIZE
    kv_at = slots[:, None] * kv_slot_stride + kv_head * kv_head_stride + dims[None, :]
    kv_mask = in_context[:, None] & dim_ok[None, :]
    keys = tl.load(key_ptr + kv_at, mask=kv_mask, other=0.0)
    values = tl.load(value_ptr + kv_at, mask=kv_mask, other=0.0)
    if FLOAT32:
        keys, values = keys.to(tl.float32), values.to(tl.float32)
    return keys, values


@triton.jit
def online_softmax_step(query, keys, values, visible, scale, running_max, running_sum, acc, PRECISION: tl.constexpr):
    """One tile of keys into each query row's running softmax (flash attention's update): `visible` [M, K]
    says which keys a row sees. A row that sees none of the tile yet keeps its zeros (shift 0, not -inf).
    The softmax weights meet the values in the values' dtype; the sums stay float32."""
    scores = tl.dot(query, tl.trans(keys), input_precision=PRECISION) * scale  # [M, K], float32
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    weights = tl.exp(scores - shift[:, None])
    rescale = tl.exp(running_max - shift)
    acc = acc * rescale[:, None] + tl.dot(weights.to(values.dtype), values, input_precision=PRECISION)
    running_sum = running_sum * rescale + tl.sum(weights, axis=1)
    return new_max, running_sum, acc
