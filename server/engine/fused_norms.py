"""RMSNorm in one kernel where the model's own norm would launch seven.

transformers' Llama-family RMSNorm casts to float32, squares, averages, adds epsilon, takes the reciprocal
square root, multiplies, casts back and scales: about seven kernels per norm, two norms per layer. In a
decode step replayed from a CUDA graph each of those tiny kernels still costs microseconds (the H200 and
H100 profiles: the norms' kernels were about a fifth of a 128-sequence step), and in an eager step that
prefills each is a launch from Python. torch's `rms_norm` normalizes in one kernel on CUDA (float32
inside, rounded to the input's dtype once, as transformers rounds it), and the scale is one more: the
same values, in two kernels. On a CPU it runs the same operations as transformers' code.

Which modules qualify is decided by what they compute, not by their class name: a module with a 1-D
`weight` and a `variance_epsilon` (transformers' name) whose output on a probe equals the fused form's
bit for bit (on the CPU). A norm that scales by `1 + weight` (Gemma's), scales before it rounds, or takes
other arguments fails the probe and keeps its own forward. A fused module keeps its class, parameters
and hooks; only its `forward` is replaced.
"""

from __future__ import annotations

import copy
from types import MethodType

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fuse_rms_norms(model: nn.Module) -> int:
    """Give every RMSNorm of `model` that computes transformers' Llama norm the fused forward; returns how many."""
    fused = 0
    for module in model.modules():
        if getattr(module.forward, "__func__", None) is _fused_forward:  # by an engine before: keep that method,
            fused += 1  # which torch.compile's guards know
        elif _computes_llama_rms_norm(module):
            module.forward = MethodType(_fused_forward, module)
            fused += 1
    return fused


def _fused_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    return self.weight * F.rms_norm(hidden_states, self.weight.shape, eps=self.variance_epsilon)


@torch.inference_mode()
def _computes_llama_rms_norm(module: nn.Module) -> bool:
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return False
    generator = torch.Generator().manual_seed(0)
    try:
        # a copy on the CPU, where torch's rms_norm runs transformers' own operations: the same bits exactly;
        # with random weights, so that a norm that scales before rounding (or by 1 + weight) cannot pass; and
        # float32 inputs too, so that one that casts to the weight's dtype before it scales cannot either
        twin = copy.deepcopy(module).cpu()
        twin.weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5 + 1)
        probe = torch.randn(4, weight.shape[0], generator=generator)
        inputs = [probe.to(dtype) for dtype in dict.fromkeys([weight.dtype, torch.float32])]
        return all(same_bits(twin.forward(x), _fused_forward(twin, x)) for x in inputs)  # forward(): no hooks
    except Exception:  # another signature, say: not this norm
        return False


def same_bits(a, b: Tensor) -> bool:
    """Whether `a` is a tensor of `b`'s dtype and shape with the same bits: unlike torch.equal, -0 is not 0."""
    if not isinstance(a, Tensor) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_integers = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[b.element_size()]
    return torch.equal(a.view(as_integers), b.view(as_integers))
