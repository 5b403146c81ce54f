"""An adapter ready to apply: its interventions per layer, on the model's device and dtype."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from server.adapters.format import AdapterFile
from server.reft.config import AdapterConfig
from server.reft.interventions import INTERVENTION_TYPES, Intervention, activation, cast_params
from server.reft.positions import PositionSpec, intervention_positions


def content_digest(adapter: AdapterFile) -> str:
    """A digest of what the adapter computes: its config and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(adapter.config.to_json().encode(), digest_size=16)
    for name in sorted(adapter.tensors):
        tensor = adapter.tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(eq=False)
class Adapter:
    name: str
    version: int
    config: AdapterConfig
    spec: PositionSpec
    layers: dict[int, list[Intervention]]  # layer -> interventions by index (#0, #1)
    nbytes: int
    # what it computes, by content: the prefix cache shares K/V only between equal digests, so a
    # reloaded adapter reuses its cached prefixes and a new version never does
    digest: str

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
        return cls(name, version, config, config.position_spec, layers, nbytes, content_digest(adapter))
