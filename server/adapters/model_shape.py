"""What an adapter is checked against: the served model's shape and the parameter magnitude bound."""

from __future__ import annotations

from dataclasses import dataclass

from server.reft.layers import decoder_layers

DEFAULT_MAX_ABS = 1e4


@dataclass(frozen=True)
class ModelShape:
    """The served model's layer count and hidden size, and the largest parameter magnitude the server
    accepts (the adapter_max_abs setting)."""

    num_layers: int
    hidden_size: int
    max_abs: float = DEFAULT_MAX_ABS

    @classmethod
    def of(cls, model, max_abs: float = DEFAULT_MAX_ABS) -> ModelShape:
        return cls(num_layers=len(decoder_layers(model)), hidden_size=model.config.hidden_size, max_abs=max_abs)
