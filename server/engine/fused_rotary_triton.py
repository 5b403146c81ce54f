"""The rotary-embedding kernel behind fused_rotary.py: one program per token rotates all its query and key
heads, rounding where transformers' operations round.

Llama's rotation of a head `x` with halves x1, x2 is [x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2]. In a
16-bit model transformers rounds each product and then the sum to the model's dtype (every eager op
computes in float32 and rounds its result); so does this kernel. The products of two 16-bit values are
exact in float32, so the bits match. In float32 the sum must not become a fused multiply-add, which would
skip the product's rounding: the launch turns fusion off.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from server.engine.paged_triton import KernelCall


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rotate_heads(
    source,
    target,
    source_base,
    target_base,
    source_head_stride,
    target_head_stride,
    heads,
    cos1,
    cos2,
    sin1,
    sin2,
    HEADS_TILE: tl.constexpr,
    HALF: tl.constexpr,
    HALF_TILE: tl.constexpr,
):
    head = tl.arange(0, HEADS_TILE)[:, None]
    dim = tl.arange(0, HALF_TILE)[None, :]
    mask = (head < heads) & (dim < HALF)
    first = source + source_base + head * source_head_stride + dim
    x1 = tl.load(first, mask=mask).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask).to(tl.float32)
    # x1 * cos1 + (-x2) * sin1, written as a difference: Triton negates as 0 - x, which would lose a zero's sign
    out1 = _rounded(x1 * cos1, target.dtype.element_ty) - _rounded(x2 * sin1, target.dtype.element_ty)
    out2 = _rounded(x2 * cos2, target.dtype.element_ty) + _rounded(x1 * sin2, target.dtype.element_ty)
    out = target + target_base + head * target_head_stride + dim
    tl.store(out, out1.to(target.dtype.element_ty), mask=mask)
    tl.store(out + HALF, out2.to(target.dtype.element_ty), mask=mask)


# what changes with a step's token count: Triton would compile a variant for each value of 1 or divisible by 16,
# some on first use while serving
STEP_INTEGERS = ["tokens", "q_batch_stride", "k_batch_stride", "cos_batch_stride"]
STEP_INTEGERS += ["q_out_batch_stride", "k_out_batch_stride"]


@triton.jit(do_not_specialize=STEP_INTEGERS)
def _rotary_kernel(
    q,
    k,
    cos,
    sin,
    q_out,
    k_out,
    tokens,
    heads,
    kv_heads,
    q_batch_stride,
    q_head_stride,
    q_token_stride,
    k_batch_stride,
    k_head_stride,
    k_token_stride,
    cos_batch_stride,
    cos_token_stride,
    q_out_batch_stride,
    q_out_head_stride,
    q_out_token_stride,
    k_out_batch_stride,
    k_out_head_stride,
    k_out_token_stride,
    HEADS_TILE: tl.constexpr,
    KV_HEADS_TILE: tl.constexpr,
    HALF: tl.constexpr,
    HALF_TILE: tl.constexpr,
):
    program = tl.program_id(0)
    batch, token = program // tokens, program % tokens
    dim = tl.arange(0, HALF_TILE)
    dim_mask = dim < HALF
    angles = batch * cos_batch_stride + token * cos_token_stride + dim
    cos1 = tl.load(cos + angles, mask=dim_mask).to(tl.float32)[None, :]
    cos2 = tl.load(cos + angles + HALF, mask=dim_mask).to(tl.float32)[None, :]
    sin1 = tl.load(sin + angles, mask=dim_mask).to(tl.float32)[None, :]
    sin2 = tl.load(sin + angles + HALF, mask=dim_mask).to(tl.float32)[None, :]
    _rotate_heads(
        q,
        q_out,
        batch * q_batch_stride + token * q_token_stride,
        batch * q_out_batch_stride + token * q_out_token_stride,
        q_head_stride,
        q_out_head_stride,
        heads,
        cos1,
        cos2,
        sin1,
        sin2,
        HEADS_TILE,
        HALF,
        HALF_TILE,
    )
    _rotate_heads(
        k,
        k_out,
        batch * k_batch_stride + token * k_token_stride,
        batch * k_out_batch_stride + token * k_out_token_stride,
        k_head_stride,
        k_out_head_stride,
        kv_heads,
        cos1,
        cos2,
        sin1,
        sin2,
        KV_HEADS_TILE,
        HALF,
        HALF_TILE,
    )


def rotary_call(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_out: Tensor, k_out: Tensor) -> KernelCall:
    """The launch that writes q and k [batch, heads, tokens, head dim] rotated by cos and sin [batch, tokens,
    head dim] into q_out and k_out (shaped as q and k); every last dimension contiguous."""
    batch, heads, tokens, head_dim = q.shape
    half = head_dim // 2
    args = (
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        tokens,
        heads,
        k.shape[1],
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        cos.stride(0),
        cos.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        q_out.stride(2),
        k_out.stride(0),
        k_out.stride(1),
        k_out.stride(2),
    )
    constexprs = {
        "HEADS_TILE": triton.next_power_of_2(heads),
        "KV_HEADS_TILE": triton.next_power_of_2(k.shape[1]),
        "HALF": half,
        "HALF_TILE": triton.next_power_of_2(half),
    }
    options = {"num_warps": 4, "enable_fp_fusion": False}  # a fused multiply-add would skip a rounding
    return KernelCall(_rotary_kernel, (batch * tokens,), args, constexprs, options)
