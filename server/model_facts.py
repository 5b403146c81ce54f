"""What the server's front end needs to know of the served model, wherever the engine runs: the engine
process (engine_process.py) sends these once, at start-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.adapters.fingerprint import model_fingerprint
from server.adapters.model_shape import ModelShape


@dataclass(frozen=True)
class ModelFacts:
    vocab_size: int
    num_layers: int
    hidden_size: int
    dtype: torch.dtype
    fingerprint: str  # adapters/fingerprint.py

    @classmethod
    def of(cls, model: nn.Module) -> ModelFacts:
        shape = ModelShape.of(model)
        return cls(
            vocab_size=model.config.vocab_size,
            num_layers=shape.num_layers,
            hidden_size=shape.hidden_size,
            dtype=next(model.parameters()).dtype,
            fingerprint=model_fingerprint(model),
        )

    def shape(self, max_abs: float) -> ModelShape:
        """What adapters are checked against (with the adapter_max_abs setting)."""
        return ModelShape(self.num_layers, self.hidden_size, max_abs)
