"""Trainable interventions: one adapter's parameters as torch modules, initialized as pyreft does.

The rotation R' (d x r) lives under `torch.nn.utils.parametrizations.orthogonal`, so every access
to `.weight` recomputes an orthonormal matrix from the raw parameters. For d > r torch uses
Householder reflections and takes each column's sign from `.int()` of the raw diagonal: weight
decay would shrink that diagonal below 1 and zero the column, so `parameter_groups` never decays
the rotation. Learned sources and projections are `nn.Linear` layers (pyreft's `learned_source`
and `proj_layer`); ConsReFT / LobiReFT learn a plain source vector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from server.adapters.format import tensor_name
from server.reft.interventions import Activation, Intervention, InterventionType, cast_params


class _LowRankRotation(nn.Module):
    """Holds R' as `weight`, d x r; only ever used through the orthogonal parametrization."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(hidden_size, rank)))


class TrainableIntervention(nn.Module):
    def __init__(self, kind: InterventionType, hidden_size: int, rank: int):
        super().__init__()
        self.kind = kind
        names = {spec.name for spec in kind.params}
        self.rotation = orthogonal(_LowRankRotation(hidden_size, rank)) if "rotation" in names else None
        self.source = nn.Linear(hidden_size, rank) if "weight" in names else None
        self.source_vector = nn.Parameter(torch.rand(rank)) if "bias" in names and self.source is None else None
        has_proj_bias = kind.param("proj_bias") is not None
        self.projection = nn.Linear(hidden_size, rank, bias=has_proj_bias) if "proj_weight" in names else None

    def params(self) -> dict[str, Tensor]:
        """The live parameters under the adapter format's names (the rotation freshly recomputed)."""
        params = {}
        if self.rotation is not None:
            params["rotation"] = self.rotation.weight
        if self.source is not None:
            params.update(weight=self.source.weight, bias=self.source.bias)
        if self.source_vector is not None:
            params["bias"] = self.source_vector
        if self.projection is not None:
            params["proj_weight"] = self.projection.weight
            if self.projection.bias is not None:
                params["proj_bias"] = self.projection.bias
        return params


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
        """Optimizer groups: the rotations never decay (see the module docstring), the rest may."""
        rotation = [
            p for ivs in self.blocks.values() for iv in ivs if iv.rotation is not None for p in iv.rotation.parameters()
        ]
        rotation_ids = {id(p) for p in rotation}
        others = [p for p in self.parameters() if id(p) not in rotation_ids]
        groups = [{"params": rotation, "weight_decay": 0.0}, {"params": others, "weight_decay": weight_decay}]
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
