"""Whether an adapter can be served: its config, then every tensor against the config and, given one,
against the base model and a bound on parameter magnitudes (finite but huge values would overflow the
edited hidden states and poison every request batched with them).

What each tensor must be comes from the type table (server/reft/interventions.py): shape, optional
or not, orthonormal or not. Every problem is an `AdapterError` that names the offending field.
"""

from __future__ import annotations

import math

import torch

from server.adapters.config_json import check_config
from server.adapters.dtypes import DTYPES
from server.adapters.errors import AdapterError
from server.adapters.format import AdapterFile, tensor_name
from server.adapters.model_shape import DEFAULT_MAX_ABS, ModelShape
from server.reft.interventions import INTERVENTION_TYPES

ORTHONORMAL_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def validate(adapter: AdapterFile, model: ModelShape | None = None) -> None:
    """Raise AdapterError naming the first problem; None means the adapter can be served.
    Without a model, magnitudes are checked against the default bound."""
    config = adapter.config
    check_config(config)
    if model is not None:
        if config.hidden_size != model.hidden_size:
            raise AdapterError(
                "hidden_size", f"adapter has hidden_size {config.hidden_size}, the model has {model.hidden_size}"
            )
        out_of_range = [layer for layer in config.layers if layer >= model.num_layers]
        if out_of_range:
            raise AdapterError(
                "layers",
                f"layer {out_of_range[0]} out of range: "
                f"the model has {model.num_layers} layers (0..{model.num_layers - 1})",
            )
    _check_tensors(adapter, model.max_abs if model is not None else DEFAULT_MAX_ABS)


def _check_tensors(adapter: AdapterFile, max_abs: float) -> None:
    config = adapter.config
    kind = INTERVENTION_TYPES[config.type]
    dims = {"d": config.hidden_size, "r": config.rank}
    expected = set()
    for layer in config.layers:
        for index in range(config.interventions_per_layer):
            for spec in kind.params:
                name = tensor_name(layer, index, spec.name)
                tensor = adapter.tensors.get(name)
                if tensor is None:
                    if spec.optional:
                        continue
                    raise AdapterError(f"tensors.{name}", "missing")
                expected.add(name)
                shape = spec.sizes(dims)
                if tuple(tensor.shape) != shape:
                    raise AdapterError(
                        f"tensors.{name}",
                        f"shape {list(tensor.shape)} does not match {list(shape)} ({'x'.join(spec.shape)})",
                    )
                if tensor.dtype not in DTYPES.values():
                    raise AdapterError(
                        f"tensors.{name}", f"must be a floating-point tensor of {', '.join(DTYPES)}; got {tensor.dtype}"
                    )
                if not torch.isfinite(tensor).all():
                    raise AdapterError(f"tensors.{name}", "contains NaN or infinite values")
                largest = tensor.abs().max().item() if tensor.numel() else 0.0
                if largest > max_abs:
                    raise AdapterError(
                        f"tensors.{name}",
                        f"holds a value of magnitude {largest:.3g}, beyond the limit of {max_abs:g} (adapter_max_abs)",
                    )
                if spec.orthonormal:
                    _check_orthonormal(name, tensor)
    unexpected = sorted(set(adapter.tensors) - expected)
    if unexpected:
        raise AdapterError(
            f"tensors.{unexpected[0]}",
            f"unexpected tensor for a {config.type} adapter with layers {list(config.layers)}",
        )


def _check_orthonormal(name: str, rotation: torch.Tensor) -> None:
    r = rotation.float()
    gram = r.T @ r
    error = (gram - torch.eye(gram.shape[0])).abs().max().item()
    tolerance = ORTHONORMAL_TOLERANCE.get(rotation.dtype, 1e-3)
    if not math.isfinite(error) or error > tolerance:
        raise AdapterError(
            f"tensors.{name}",
            f"columns are not orthonormal (max |R^T R - I| = {error:.3g}); "
            "a rotation trained with weight decay collapses",
        )
