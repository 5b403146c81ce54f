"""An adapter ready to apply: its interventions per layer, on the model's device and dtype.

It is made from an adapter file by server/adapters/materialize.py; the ReFT core only applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.reft.config import AdapterConfig
from server.reft.interventions import Intervention
from server.reft.positions import PositionSpec, intervention_positions


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
