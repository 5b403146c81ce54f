"""Trainable interventions: one adapter's parameters as torch modules, made from the type table.

Every parameter comes from its `ParamSpec` (shape, initialization; the built-in types initialize as
pyreft does). An orthonormal one (R', d x r) lives under `torch.nn.utils.parametrizations.orthogonal`,
so every access to it recomputes an orthonormal matrix from the raw parameters. For d > r torch uses
Householder reflections and takes each column's sign from `.int()` of the raw diagonal: weight decay
would shrink that diagonal below 1 and zero the column, so `parameter_groups` never decays them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from server.adapters.format import tensor_name
from server.reft.interventions import Activation, Intervention, InterventionType, cast_params


class _OrthonormalHolder(nn.Module):
    """Holds one d x r matrix as `weight`; only ever used through the orthogonal parametrization."""

    def __init__(self, initial: Tensor):
        super().__init__()
        self.weight = nn.Parameter(initial)


class TrainableIntervention(nn.Module):
    def __init__(self, kind: InterventionType, hidden_size: int, rank: int):
        super().__init__()
        self.kind = kind
        dims = {"d": hidden_size, "r": rank}
        self.orthonormal = nn.ModuleDict()
        self.free = nn.ParameterDict()
        for spec in kind.params:  # in the table's order: the random initialization depends on it
            initial = spec.fresh(dims)
            if spec.orthonormal:
                self.orthonormal[spec.name] = orthogonal(_OrthonormalHolder(initial))
            else:
                self.free[spec.name] = nn.Parameter(initial)

    def params(self) -> dict[str, Tensor]:
        """The live parameters under the adapter format's names (orthonormal ones freshly recomputed)."""
        return {
            spec.name: self.orthonormal[spec.name].weight if spec.orthonormal else self.free[spec.name]
            for spec in self.kind.params
        }


class TrainableAdapter(nn.Module):
    """`per_layer` interventions (#0, #1) on each of `layers`; master weights in fp32."""

    def __init__(self, kind: InterventionType, hidden_size: int, rank: int, layers: tuple[int, ...], per_layer: int):
        super().__init__()
        self.kind = kind
        self.blocks = nn.ModuleDict(
            {
                str(layer): nn.ModuleList(TrainableIntervention(kind, hidden_size, rank) for _ in range(per_layer))
                for layer in layers
            }
        )

    def interventions(self, act: Activation, dtype: torch.dtype, device: torch.device) -> dict[int, list[Intervention]]:
        """This step's interventions for a model of `dtype`; the cast to it stays differentiable."""
        return {
            int(layer): [Intervention(self.kind, act, cast_params(self.kind, iv.params(), dtype, device)) for iv in ivs]
            for layer, ivs in self.blocks.items()
        }

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups: orthonormal parameters never decay (see the module docstring), the rest may."""
        orthonormal = [p for ivs in self.blocks.values() for iv in ivs for p in iv.orthonormal.parameters()]
        orthonormal_ids = {id(p) for p in orthonormal}
        others = [p for p in self.parameters() if id(p) not in orthonormal_ids]
        groups = [{"params": orthonormal, "weight_decay": 0.0}, {"params": others, "weight_decay": weight_decay}]
        return [group for group in groups if group["params"]]

    @torch.no_grad()
    def export(self) -> dict[str, Tensor]:
        """fp32 CPU tensors named as in the adapter format; R' as the plain orthonormal matrix."""
        return {
            tensor_name(int(layer), index, name): tensor.detach().float().cpu().contiguous().clone()
            for layer, ivs in self.blocks.items()
            for index, iv in enumerate(ivs)
            for name, tensor in iv.params().items()
        }
