"""Random adapters of any registered intervention type, for tests and benchmarks.

Shapes and which parameters are orthonormal come from the type table, so a plugin type gets random
adapters as the built-in ones do.
"""

from __future__ import annotations

import torch

from server.adapters.format import AdapterFile, tensor_name
from server.adapters.validation import validate
from server.reft.config import AdapterConfig
from server.reft.interventions import INTERVENTION_TYPES


def random_adapter_file(
    kind: str,
    layers: tuple[int, ...],
    rank: int,
    positions: str,
    hidden_size: int,
    share_weights: bool = True,
    seed: int = 0,
    scale: float = 1.0,
) -> AdapterFile:
    """A random adapter of `kind`, strong enough to change greedy outputs of a tiny model."""
    g = torch.Generator().manual_seed(seed)
    config = AdapterConfig(kind, rank, hidden_size, tuple(layers), positions, share_weights)
    tensors = {}
    for layer in layers:
        for index in range(config.interventions_per_layer):
            for spec in INTERVENTION_TYPES[kind].params:
                shape = spec.sizes({"d": hidden_size, "r": rank})
                if spec.orthonormal:
                    tensor = torch.linalg.qr(torch.randn(*shape, generator=g))[0].contiguous()
                else:
                    tensor = torch.randn(*shape, generator=g) * scale
                tensors[tensor_name(layer, index, spec.name)] = tensor
    adapter = AdapterFile(config, tensors)
    validate(adapter)
    return adapter
