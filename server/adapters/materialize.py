"""An adapter file made servable: its parameters placed for the model's dtype and device as an `Adapter`.

This is the one bridge from the stored form (server/adapters/format.py) to the ReFT core
(server/reft/adapter.py), so that the core never imports the file format.
"""

from __future__ import annotations

import hashlib

import torch

from server.adapters.format import AdapterFile
from server.reft.adapter import Adapter
from server.reft.interventions import INTERVENTION_TYPES, Intervention, activation, cast_params


def content_digest(adapter: AdapterFile) -> str:
    """A digest of what the adapter computes: its config and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(adapter.config.to_json().encode(), digest_size=16)
    for name in sorted(adapter.tensors):
        tensor = adapter.tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def materialize(
    adapter: AdapterFile,
    *,
    name: str,
    version: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Adapter:
    """A validated adapter file as an Adapter for a model of `dtype` on `device`."""
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
    return Adapter(name, version, config, config.position_spec, layers, nbytes, content_digest(adapter))
