"""Apply an adapter to a plain transformers forward with forward hooks (no engine involved).

This is the straightforward path: the slow reference generator, the trainer and the benchmarks'
"one adapter at a time" baseline use it. Hidden states are [batch, tokens, hidden]; each
intervention index gets its own (batch indices, position indices) locations.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from server.reft.interventions import Intervention
from server.reft.layers import decoder_layers

Locations = Sequence[tuple[Tensor, Tensor]]  # per intervention index: (batch indices, position indices)


def locations_for_prompts(
    position_lists: Sequence[Sequence[Sequence[int]]], device=None
) -> list[tuple[Tensor, Tensor]]:
    """Locations for a batch: position_lists[b][k] = positions of intervention #k in batch row b."""
    per_index = max((len(rows) for rows in position_lists), default=0)
    locations = []
    for k in range(per_index):
        batch = [b for b, rows in enumerate(position_lists) for _ in rows[k]]
        positions = [p for rows in position_lists for p in rows[k]]
        locations.append(
            (
                torch.tensor(batch, dtype=torch.long, device=device),
                torch.tensor(positions, dtype=torch.long, device=device),
            )
        )
    return locations


def _edit(interventions: Sequence[Intervention], locations: Locations, hidden: Tensor) -> Tensor:
    for intervention, (batch, positions) in zip(interventions, locations, strict=False):
        if positions.numel():
            hidden = hidden.index_put((batch, positions), intervention(hidden[batch, positions]))
    return hidden


@contextmanager
def apply_adapter(
    model: nn.Module, layers: Mapping[int, Sequence[Intervention]], locations: Locations
) -> Iterator[None]:
    """While active, every forward of `model` edits the given locations at the adapter's layers."""
    blocks = decoder_layers(model)

    def make_hook(interventions):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (_edit(interventions, locations, output[0]), *output[1:])
            return _edit(interventions, locations, output)

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(ivs)) for layer, ivs in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
