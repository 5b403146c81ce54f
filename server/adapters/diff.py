"""`adapters diff NAME@A NAME@B`: what changed between two stored versions: config fields,
provenance entries, and how far the parameters moved (relative norm of the change, per tensor
and overall), which says whether a retrain changed the adapter a little or a lot."""

from __future__ import annotations

import json

import torch

from server.adapters.format import AdapterFile


def diff_adapters(old: AdapterFile, new: AdapterFile) -> dict:
    old_config = json.loads(old.config.to_json())
    new_config = json.loads(new.config.to_json())
    old_provenance = old_config.pop("provenance", {})
    new_provenance = new_config.pop("provenance", {})
    return {
        "config": _changed(old_config, new_config),
        "provenance": _changed(old_provenance, new_provenance),
        "parameters": _parameter_change(old.tensors, new.tensors),
    }


def _changed(old: dict, new: dict) -> dict:
    """{key: [old value, new value]} for every key whose value differs (None = absent)."""
    return {key: [old.get(key), new.get(key)] for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def _parameter_change(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict:
    """||new - old|| / ||old|| for tensors of the same name and shape; the others are listed apart."""
    comparable = sorted(name for name in set(old) & set(new) if old[name].shape == new[name].shape)
    per_tensor, change_sq, base_sq = {}, 0.0, 0.0
    for name in comparable:
        before, after = old[name].double(), new[name].double()
        delta, norm = (after - before).norm().item(), before.norm().item()
        per_tensor[name] = delta / norm if norm else None
        change_sq, base_sq = change_sq + delta**2, base_sq + norm**2
    return {
        "relative_change": change_sq**0.5 / base_sq**0.5 if base_sq else None,
        "per_tensor": per_tensor,
        "only_in_first": sorted(set(old) - set(new)),
        "only_in_second": sorted(set(new) - set(old)),
        "shape_changed": sorted(name for name in set(old) & set(new) if old[name].shape != new[name].shape),
    }
