"""An adapter ready to apply: its interventions per layer, on the model's device and dtype."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from server.adapters.format import AdapterConfig, AdapterFile
from server.reft.interventions import INTERVENTION_TYPES, Intervention, activation, cast_params
from server.reft.positions import PositionSpec, intervention_positions

_serials = itertools.count()


@dataclass(eq=False)
class Adapter:
    name: str
    version: int
    config: AdapterConfig
    spec: PositionSpec
    layers: dict[int, list[Intervention]]  # layer -> interventions by index (#0, #1)
    nbytes: int
    # unique per loaded object: KV computed with one adapter object is only ever reused for it
    serial: int = field(init=False, default_factory=lambda: next(_serials))

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def positions(self, prompt_len: int) -> list[list[int]]:
        """Prompt positions edited by intervention #index of every layer, for a prompt of this length."""
        return intervention_positions(self.spec, self.config.share_weights, prompt_len)

    @classmethod
    def from_file(
        cls,
        adapter: AdapterFile,
        *,
        name: str,
        version: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Adapter:
        """Materialize a validated adapter file for a model of `dtype` on `device`."""
        config = adapter.config
        kind = INTERVENTION_TYPES[config.type]
        act = activation(config.activation)
        layers = {
            layer: [
                Intervention(kind, act, cast_params(kind, adapter.intervention_params(layer, index), dtype, device))
                for index in range(config.interventions_per_layer)
            ]
            for layer in config.layers
        }
        nbytes = sum(t.numel() * t.element_size() for ivs in layers.values() for iv in ivs for t in iv.params.values())
        return cls(name, version, config, config.position_spec, layers, nbytes)
