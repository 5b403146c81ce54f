"""Rotary embeddings in one kernel a layer on CUDA, with the model's own bits.

transformers' Llama-family attention rotates its queries and keys with the modeling file's
`apply_rotary_pos_emb`: `q * cos + rotate_half(q) * sin` and the same for `k`, about ten small kernels a
layer (a concatenation, a negation, two products and a sum each), 160 of a `1b` decode step's graph. On
CUDA fused_rotary_triton.py rotates a token's queries and keys in one launch, rounding where those
operations round, so its values are the same bits. Everywhere else (CPU tensors, other dtype mixes or
arguments, and inside torch.compile, whose Inductor fuses the rotation itself) the model's own function
runs.

The function is a global of each model family's modeling module, so that is where it is replaced (as Liger
Kernel patches transformers): `fuse_rotary(model)` replaces it in the modules of the model's attention
classes, where a probe shows that it computes Llama's rotation bit for bit. The replacement is process-wide
for that family; for anything the kernel does not take it calls the original.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from torch import Tensor, nn

from server.engine.fused_norms import same_bits

log = logging.getLogger(__name__)
FUNCTION_NAME = "apply_rotary_pos_emb"


_FUSED: dict[ModuleType, FusedRotary] = {}  # the modeling modules whose function goes through the kernel


def fuse_rotary(model: nn.Module) -> int:
    """Route the rotary function of the model's attention modules through the fused kernel where it computes
    Llama's rotation; returns how many modeling modules now do."""
    fused = 0
    for module in {sys.modules.get(type(m).__module__) for m in model.modules()}:
        function = getattr(module, FUNCTION_NAME, None)
        if isinstance(function, FusedRotary):
            fused += 1
        elif callable(function) and _computes_llama_rotation(function):
            _FUSED[module] = FusedRotary(function)
            setattr(module, FUNCTION_NAME, _FUSED[module])
            fused += 1
    return fused


@contextmanager
def transformers_own_rotation() -> Iterator[None]:
    """Within, every modeling module's rotary function is transformers' own again: for baselines that must run
    plain transformers in a process where an engine runs too."""
    for module, fused in _FUSED.items():
        setattr(module, FUNCTION_NAME, fused.original)
    try:
        yield
    finally:
        for module, fused in _FUSED.items():
            setattr(module, FUNCTION_NAME, fused)


class FusedRotary:
    """A modeling module's `apply_rotary_pos_emb`, through the kernel where it applies. If the kernel fails (say,
    this Triton cannot compile it), the error is logged once and the original serves from then on."""

    def __init__(self, original: Callable):
        self.original = original
        self.failed = False

    def __call__(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.failed or args or kwargs or not _kernel_takes(q, k, cos, sin):
            return self.original(q, k, cos, sin, *args, **kwargs)
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # q's and k's layouts (transposed views)
        try:
            from server.engine.fused_rotary_triton import rotary_call  # Triton ships with CUDA builds of torch

            rotary_call(q, k, cos, sin, q_out, k_out).launch()
        except Exception:
            log.exception("the fused rotary kernel failed: the model's own rotation runs from now on")
            self.failed = True
            return self.original(q, k, cos, sin)
        return q_out, k_out


def llama_rotation(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Llama's rotation, as transformers writes it: what the probe and the kernel's tests hold to."""

    def rotate_half(x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # it computes in float32


def _kernel_takes(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    return (
        not torch.compiler.is_compiling()
        and q.is_cuda
        and q.device.index == torch.cuda.current_device()  # Triton launches on the current device
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, cos, sin)))  # it has no backward
        and q.dtype in KERNEL_DTYPES
        and q.dim() == k.dim() == 4
        and cos.dim() == sin.dim() == 3
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and q.shape[-1] % 2 == 0
        and k.shape[0] == q.shape[0]
        and k.shape[2:] == q.shape[2:]
        and cos.shape == sin.shape == (q.shape[0], q.shape[2], q.shape[3])
        and cos.stride() == sin.stride()
        and all(t.stride(-1) == 1 for t in (q, k, cos, sin))
    )


@torch.inference_mode()
def _computes_llama_rotation(function: Callable) -> bool:
    """Whether `function(q, k, cos, sin)` gives `llama_rotation`'s bits, in float32 and in bfloat16, on the CPU."""
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 5, 3, 8, generator=generator).to(dtype).transpose(1, 2)  # HF's [batch, heads, tokens, D]
        k = torch.randn(1, 5, 2, 8, generator=generator).to(dtype).transpose(1, 2)
        cos, sin = (torch.randn(1, 5, 8, generator=generator).to(dtype) for _ in range(2))
        try:
            got = function(q, k, cos, sin)
        except Exception:  # another signature: not this rotation
            return False
        expected = llama_rotation(q, k, cos, sin)
        if not (isinstance(got, tuple) and len(got) == 2 and all(map(same_bits, got, expected))):
            return False
    return True
