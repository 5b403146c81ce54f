"""Locate a causal LM's decoder layers without per-family module paths."""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks: `model.model.layers` (Llama, Qwen2, Mistral), `transformer.h`
    (GPT-2), ... found as the list of `num_hidden_layers` same-class modules."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    candidates = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(block) for block in module}) == 1
        and (count is None or len(module) == count)
    ]
    if not candidates:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))
