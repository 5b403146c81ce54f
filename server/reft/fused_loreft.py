"""LoReFT on CUDA in one kernel launch per batch of segments and layer (fused_loreft_triton.py).

The torch formula (interventions.loreft over stacked parameters) gathers the rows, then runs a dozen small
operators and writes the rows back: each a launch, and on a GPU each launch costs the host more than the
device. With 64 adapters a step that prefills runs 16 such batches (8 layers, two interventions each), and
run F measured those launches at 6 ms of host time per step (23.0 against 16.3 ms). The kernel reads the
rows where they are and edits them in place, one launch for all of a batch's segments.

It serves what it was written for: the LoReFT type with the linear (identity) activation, float32 rotations
and the source in the model's dtype, on the current CUDA device, outside autograd and torch.compile. For
anything else, and once after a failed launch (logged; say, a Triton that cannot compile it), the caller's
torch formula runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor
from transformers.activations import LinearActivation

log = logging.getLogger(__name__)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_failed = False  # a launch raised once: the torch formula serves from then on


def loreft_in_place(
    hidden: Tensor,
    rows: Tensor,
    positions: Tensor,
    segment_length: int,
    stacked: Callable[[], dict[str, Tensor]],
    layer_index: int,
    act: Callable[[Tensor], Tensor],
) -> bool:
    """Edit `hidden`'s `rows` [T, d] in place if the kernel takes them; whether it did. Row i belongs to segment
    positions[i] // segment_length of the parameters `stacked()` makes, [layers, S, ...], at layer position
    `layer_index`; they are asked for only where the kernel would run (elsewhere the formula may not need them)."""
    global _failed
    if _failed or not _kernel_runs(hidden, act):
        return False
    params = stacked()
    if not _kernel_takes(hidden, params):
        return False
    try:
        from server.reft.fused_loreft_triton import loreft_launch  # Triton ships with CUDA builds of torch

        kernel, grid, args, constexprs, options = loreft_launch(
            hidden, rows, positions, segment_length, params, layer_index
        )
        kernel[grid](*args, **constexprs, **options)
    except Exception:
        log.exception("the fused LoReFT kernel failed: the torch formula edits from now on")
        _failed = True
        return False
    return True


def _kernel_runs(hidden: Tensor, act: Callable[[Tensor], Tensor]) -> bool:
    """Whether the kernel can edit these rows, whatever the parameters."""
    return (
        isinstance(act, LinearActivation)
        and not torch.compiler.is_compiling()
        and hidden.is_cuda
        and hidden.device.index == torch.cuda.current_device()  # Triton launches on the current device
        and hidden.dtype in KERNEL_DTYPES
        and hidden.dim() == 2
        and hidden.stride(1) == 1
    )


def _kernel_takes(hidden: Tensor, params: dict[str, Tensor]) -> bool:
    """Whether the kernel takes these parameters for the rows `_kernel_runs` allowed."""
    rotation, weight, bias = params.get("rotation"), params.get("weight"), params.get("bias")
    return (
        rotation is not None
        and weight is not None
        and bias is not None
        and len(params) == 3
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, rotation, weight, bias)))
        and rotation.dtype == torch.float32
        and weight.dtype == bias.dtype == hidden.dtype
        and _shapes_agree(hidden.shape[1], rotation, weight, bias)
        and all(t.is_contiguous() and t.device == hidden.device for t in (rotation, weight, bias))
    )


def _shapes_agree(d: int, rotation: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """Stacks [layers, S, d, r], [layers, S, r, d] and [layers, S, 1, r]: the kernel reads them by these sizes, so
    a misshapen adapter must reach the torch formula, which raises (and fails only its owners)."""
    if rotation.dim() != 4:
        return False
    stack, r = rotation.shape[:2], rotation.shape[3]
    return rotation.shape[2] == d and weight.shape == (*stack, r, d) and bias.shape == (*stack, 1, r)
