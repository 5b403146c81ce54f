"""The ReFT family as pure tensor functions, with pyreft's formulas and dtype behaviour.

Every function maps hidden states `h` of shape [n, d] to edited states of the same shape and dtype.
The same formulas serve many adapters at once: with `h` [S, M, d] and every parameter stacked along a
leading S axis (1-D parameters as [S, 1, n], see `stack_params`), segment s is edited by adapter s.
The trainer, the reference path and the engine all run these functions.
Notation (pyreft's): R' is d x r with orthonormal columns (the paper's R^T), W and W2 are r x d,
b is r. Projections through R' run in R's dtype (fp32) and the sum with `h` happens in the wider
dtype before the cast back, exactly as pyreft does; linear maps run in `h`'s dtype.

Parameters of the built-in types (names used in the adapter file; pyreft's state-dict keys):
  rotation     R'  [d, r]  fp32, orthonormal columns                rotate_layer
  weight       W   [r, d]  learned source weight                    learned_source.weight
  bias         b   [r]     learned source bias (ConsReFT/LobiReFT:  learned_source.bias
                           the learned source vector)               (learned_source)
  proj_weight  W2  [r, d]  NoReFT / NoDiReFT projection             proj_layer.weight
  proj_bias    b2  [r]     NoReFT projection bias (optional)        proj_layer.bias

The table (`INTERVENTION_TYPES`) is the one place that knows a type: its formula, its parameters'
names, shapes, initialization, dtype, which are orthonormal and where pyreft keeps them. Training,
validation, pyreft import, random adapters and serving all read it, so a plugin type declared with
`register_intervention_type` needs nothing else.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from server.reft.fused_loreft import loreft_in_place

Params = Mapping[str, Tensor]
Activation = Callable[[Tensor], Tensor]
FusedEdit = Callable[[Tensor, Tensor, Tensor, int, Callable[[], Params], int, Activation], bool]


@functools.cache
def activation(name: str) -> Activation:
    """pyreft's activation lookup: transformers' ACT2FN, "linear" (the default) is the identity. One
    object per name (ACT2FN makes a new module each time): the step plan batches equal activations."""
    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(ACT2FN))}")
    function = ACT2FN[name]
    # prelu and xielu learn weights that no adapter file carries; shared fp32 CPU copies would also
    # break every bf16 or GPU forward
    if isinstance(function, nn.Module) and next(function.parameters(), None) is not None:
        raise ValueError(f"activation {name!r} has learned parameters, which adapters do not carry")
    return function


def linear(h: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """h W^T + b for one weight [r, d] or a stack [S, r, d]; the stacked form rounds exactly as F.linear does."""
    if weight.dim() == 2:
        return F.linear(h, weight, bias)
    if bias is None:
        return torch.bmm(h, weight.mT)
    return torch.baddbmm(bias, h, weight.mT)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b; for stacks ([S, M, k] @ [S, k, n]) one bmm, without the expands and reshapes that matmul wraps
    around the same kernel (the same bits, a third of the operators: a step edits many layers)."""
    return torch.bmm(a, b) if a.dim() == b.dim() == 3 else a @ b


def loreft(h: Tensor, p: Params, act: Activation) -> Tensor:
    """LoReFT: h + (act(W h + b) - h R') R'^T."""
    rotation = p["rotation"]
    rotated = matmul(h.to(rotation.dtype), rotation)
    source = act(linear(h, p["weight"], p["bias"]))
    return (h + matmul(source - rotated, rotation.mT)).to(h.dtype)


def noreft(h: Tensor, p: Params, act: Activation) -> Tensor:
    """NoReFT: h + (act(W1 h + b1) - (W2 h + b2)) W2, no orthogonality."""
    projected = linear(h, p["proj_weight"], p.get("proj_bias"))
    source = act(linear(h, p["weight"], p["bias"]))
    return (h + matmul(source - projected, p["proj_weight"])).to(h.dtype)


def direft(h: Tensor, p: Params, act: Activation) -> Tensor:
    """DiReFT: h + act(W h + b) R'^T."""
    rotation = p["rotation"]
    source = act(linear(h.to(p["weight"].dtype), p["weight"], p["bias"]))
    return (h + matmul(source.to(rotation.dtype), rotation.mT)).to(h.dtype)


def nodireft(h: Tensor, p: Params, act: Activation) -> Tensor:
    """NoDiReFT: h + act(W1 h + b1) W2."""
    source = act(linear(h, p["weight"], p["bias"]))
    return (h + matmul(source, p["proj_weight"])).to(h.dtype)


def consreft(h: Tensor, p: Params, act: Activation) -> Tensor:
    """ConsReFT: h + (b - h R') R'^T (no activation)."""
    rotation = p["rotation"]
    rotated = matmul(h.to(rotation.dtype), rotation)
    return (h + matmul(p["bias"] - rotated, rotation.mT)).to(h.dtype)


def lobireft(h: Tensor, p: Params, act: Activation) -> Tensor:
    """LobiReFT: h + b R'^T (a constant shift inside the subspace)."""
    rotation = p["rotation"]
    return (h + matmul(p["bias"], rotation.mT)).to(h.dtype)


def stack_params(params: Sequence[Params]) -> dict[str, Tensor]:
    """Parameters of several interventions of one type stacked for the batched form of the formulas:
    [S, ...] per name, 1-D parameters as [S, 1, n] so that they broadcast over each segment's rows."""
    stacked = {}
    for name, first in params[0].items():
        tensor = torch.stack([p[name] for p in params])
        stacked[name] = tensor.unsqueeze(1) if first.dim() == 1 else tensor
    return stacked


Dims = Mapping[str, int]  # the sizes of the shape axes: {"d": hidden size, "r": rank}
Init = Callable[[Tensor, Dims], Tensor]  # fills a fresh parameter in place


def orthogonal_init(tensor: Tensor, dims: Dims) -> Tensor:
    return nn.init.orthogonal_(tensor)


def linear_weight_init(tensor: Tensor, dims: Dims) -> Tensor:
    """nn.Linear's default for its weight (pyreft's learned sources and projections are nn.Linear)."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def linear_bias_init(tensor: Tensor, dims: Dims) -> Tensor:
    """nn.Linear's default for the bias of a d -> r layer."""
    bound = 1 / math.sqrt(dims["d"])
    return nn.init.uniform_(tensor, -bound, bound)


def unit_uniform_init(tensor: Tensor, dims: Dims) -> Tensor:
    return nn.init.uniform_(tensor)


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of an intervention type: everything the server needs to know about it."""

    name: str
    shape: tuple[str, ...]  # in terms of "d" (hidden size) and "r" (rank)
    init: Init  # how training initializes it
    fp32: bool = False  # kept in fp32 whatever the model dtype (pyreft keeps these in fp32)
    optional: bool = False  # may be absent from an adapter file
    orthonormal: bool = False  # a d x r matrix with orthonormal columns: validated, trained on the manifold
    # keys that may hold it in a pyreft intervention's state dict, the first present wins; an orthonormal
    # one may also be saved as torch's orthogonal parametrization of the key ("<key>.parametrizations...")
    pyreft_names: tuple[str, ...] = ()

    def sizes(self, dims: Dims) -> tuple[int, ...]:
        """Its shape in numbers, for a hidden size and rank."""
        return tuple(dims[axis] for axis in self.shape)

    def fresh(self, dims: Dims) -> Tensor:
        """A new fp32 tensor initialized as training starts it."""
        return self.init(torch.empty(self.sizes(dims)), dims)


@dataclass(frozen=True)
class InterventionType:
    """A row of the type table. `apply(h, params, act)` must accept one intervention's parameters with
    h [n, d] and, for batched serving, parameters stacked along a leading segment axis with h [S, M, d]
    (1-D parameters then come as [S, 1, n]; `linear` covers W h + b in both forms). Parameters are
    created for training in the order of `params`."""

    name: str
    apply: Callable[[Tensor, Params, Activation], Tensor]
    params: tuple[ParamSpec, ...]
    pyreft_class: str | None = None  # the class name in pyreft checkpoints, for import
    # where it can, edits rows of the step in place in one launch: fused(hidden [T, d], rows, positions,
    # segment_length, stacked, layer_index, act) -> whether it did (plan.EditBatch); stacked() makes the
    # parameters stacked [layers, S, ...], to be called only where it edits
    fused: FusedEdit | None = None

    def param(self, name: str) -> ParamSpec | None:
        return next((s for s in self.params if s.name == name), None)

    @property
    def importable_from_pyreft(self) -> bool:
        """Whether every parameter an adapter needs says where pyreft keeps it."""
        return all(spec.pyreft_names for spec in self.params if not spec.optional)


# pyreft's LoReFT writes its learned source as plain "weight" / "bias" keys, the other types as learned_source.*
_ROTATION = ParamSpec(
    "rotation", ("d", "r"), orthogonal_init, fp32=True, orthonormal=True, pyreft_names=("rotate_layer",)
)
_WEIGHT = ParamSpec("weight", ("r", "d"), linear_weight_init, pyreft_names=("learned_source.weight", "weight"))
_BIAS = ParamSpec("bias", ("r",), linear_bias_init, pyreft_names=("learned_source.bias", "bias"))
_SOURCE_VECTOR = ParamSpec(
    "bias", ("r",), unit_uniform_init, fp32=True, pyreft_names=("learned_source", "learned_source.bias", "bias")
)
_PROJ_WEIGHT = ParamSpec("proj_weight", ("r", "d"), linear_weight_init, pyreft_names=("proj_layer.weight",))
_PROJ_BIAS = ParamSpec("proj_bias", ("r",), linear_bias_init, optional=True, pyreft_names=("proj_layer.bias",))

INTERVENTION_TYPES: dict[str, InterventionType] = {}


def register_intervention_type(kind: InterventionType) -> InterventionType:
    """Add a type to the table: the documented way for a plugin module (`--plugin`) to bring a new
    intervention. Training, validation, random adapters and batched serving then take it as they
    take the built-in ones. Registering the same object twice is harmless; another type under a
    taken name is refused."""
    known = INTERVENTION_TYPES.get(kind.name)
    if known is not None and known is not kind:
        raise ValueError(f"intervention type {kind.name!r} is already registered")
    names = [spec.name for spec in kind.params]
    if len(set(names)) != len(names):
        raise ValueError(f"intervention type {kind.name!r} names a parameter twice: {names}")
    for spec in kind.params:
        if not spec.shape or set(spec.shape) - {"d", "r"}:
            raise ValueError(f"{kind.name}.{spec.name}: shape axes must be 'd' or 'r', got {spec.shape}")
        if spec.orthonormal and spec.shape != ("d", "r"):
            raise ValueError(f"{kind.name}.{spec.name}: an orthonormal parameter is d x r")
    INTERVENTION_TYPES[kind.name] = kind
    return kind


for _builtin in (
    InterventionType("loreft", loreft, (_ROTATION, _WEIGHT, _BIAS), "LoreftIntervention", loreft_in_place),
    InterventionType("noreft", noreft, (_WEIGHT, _BIAS, _PROJ_WEIGHT, _PROJ_BIAS), "NoreftIntervention"),
    InterventionType("direft", direft, (_ROTATION, _WEIGHT, _BIAS), "DireftIntervention"),
    InterventionType("nodireft", nodireft, (_WEIGHT, _BIAS, _PROJ_WEIGHT), "NodireftIntervention"),
    InterventionType("consreft", consreft, (_ROTATION, _SOURCE_VECTOR), "ConsreftIntervention"),
    InterventionType("lobireft", lobireft, (_ROTATION, _SOURCE_VECTOR), "LobireftIntervention"),
):
    register_intervention_type(_builtin)


def intervention_type(name: str) -> InterventionType:
    try:
        return INTERVENTION_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown intervention type {name!r}; known: {', '.join(INTERVENTION_TYPES)}") from None


@dataclass(frozen=True)
class Intervention:
    """One intervention ready to apply: its type, activation and parameters on the model's device."""

    kind: InterventionType
    act: Activation
    params: Params

    def __call__(self, h: Tensor) -> Tensor:
        return self.kind.apply(h, self.params, self.act)

    @functools.cached_property
    def batch_shape(self) -> tuple:
        """What interventions must share to run as one batch (plan.py): type, activation, parameter shapes and
        dtypes. Kept: a step plan asks for it per layer and adapter."""
        params = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(self.params.items()))
        return (self.kind.name, self.act, params)


def cast_params(kind: InterventionType, params: Params, dtype: torch.dtype, device: torch.device | str) -> dict:
    """Place parameters for a model of `dtype`: rotations and source vectors stay fp32 (as in pyreft)."""
    placed = {}
    for name, tensor in params.items():
        spec = kind.param(name)
        placed[name] = place(tensor, torch.float32 if spec is not None and spec.fp32 else dtype, device)
    return placed


def place(tensor: Tensor, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """`tensor` in `dtype` on `device`. From the host to a CUDA device it is cast on the host (the same bits)
    and sent from pinned memory without waiting: a copy from pageable memory would first wait for all the
    device's queued work, and an adapter arriving while the engine serves would hold up the thread that
    receives it (and the requests queued behind it) for steps. Kernels queued after the copy see its data."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(dtype=dtype).pin_memory().to(device, non_blocking=True)
