"""What a person says about an adapter's shape, from a flag, a form field or a training command, in
one form: `AdapterOptions`, with `parse_layers` the one reading of a layer list.

The CLI (`adapters import-pyreft|pull`, `train`) and the admin API build these, then hand the fields
to the importer or the trainer, which build the `AdapterConfig`.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

LAYERS_HELP = '"8;16", "8,16" or "all"'


def parse_layers(text: str | None, num_layers: int | None = None) -> tuple[int, ...] | None:
    """ "8;16" or "8,16" -> (8, 16), empty parts skipped; "all" -> every one of the model's `num_layers`
    (only where the model is known); None or "" -> None (not given). Raises ValueError otherwise."""
    if not text or not text.strip():
        return None
    if text.strip().lower() == "all":
        if num_layers is None:
            raise ValueError('layers "all" needs the model: name the layers, as in "8;16"')
        return tuple(range(num_layers))
    try:
        layers = tuple(int(part) for part in text.replace(";", ",").split(",") if part.strip())
    except ValueError:
        raise ValueError(f"invalid layers {text!r}: use {LAYERS_HELP}") from None
    if not layers:
        raise ValueError(f"layers {text!r} names no layer")
    return layers


@dataclass(frozen=True)
class AdapterOptions:
    """The adapter config fields a caller chooses. For a pyreft import, None means "as the checkpoint
    says" (pyreft does not record positions, weight sharing or the activation: those must be given)."""

    positions: str | None = None
    share_weights: bool = False
    activation: str = "linear"
    intervention_type: str | None = None
    layers: tuple[int, ...] | None = None
    rank: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, num_layers: int | None = None) -> AdapterOptions:
        """From the flags `--positions --share-weights --activation --type --layers --rank`."""
        return cls(
            positions=args.positions,
            share_weights=args.share_weights,
            activation=args.activation,
            intervention_type=args.intervention_type,
            layers=parse_layers(args.layers, num_layers),
            rank=args.rank,
        )

    def fields(self) -> dict:
        """As keyword arguments of `import_pyreft` and `train_adapter`."""
        return asdict(self)
