"""What an adapter computes, as data: its intervention type, rank, layers, positions and the rest.

`AdapterConfig` is the JSON an adapter file carries in its header (server/adapters/format.py writes
and reads it, server/adapters/config_json.py checks it when it comes from outside). It lives here,
with the interventions and positions it names, so that the ReFT core needs nothing outside itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from server.reft.positions import PositionSpec, interventions_per_layer, parse_positions

FORMAT_VERSION = 1
# Empty additions stay out of the JSON, so replicas older than them still read such adapters.
OMITTED_WHEN_EMPTY = ("base_model_fingerprint", "provenance")


@dataclass(frozen=True)
class AdapterConfig:
    type: str
    rank: int
    hidden_size: int
    layers: tuple[int, ...]
    positions: str
    share_weights: bool = True
    activation: str = "linear"
    base_model: str = ""
    dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    base_model_fingerprint: str = ""  # server/adapters/fingerprint.py; "" = unverified
    provenance: dict = field(default_factory=dict, compare=False)  # how it was made: data, arguments, losses

    @property
    def position_spec(self) -> PositionSpec:
        return parse_positions(self.positions)

    @property
    def interventions_per_layer(self) -> int:
        return interventions_per_layer(self.share_weights)

    def to_json(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if v or k not in OMITTED_WHEN_EMPTY}
        return json.dumps(fields, sort_keys=True)
