"""Per-step intervention plan: which packed rows each adapter's interventions edit, per layer.

A step packs many sequences into one row of T tokens. For every sequence with an adapter whose
prefill chunk covers some of its edited prompt positions, the rows of those positions are grouped
by (adapter, intervention index) across the step, so each group is one batched matmul per layer.
Decode-only steps and requests without adapters produce no groups: the plain model runs.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from server.reft.adapter import Adapter
from server.reft.interventions import Intervention


@dataclass(frozen=True)
class Chunk:
    """Rows [row, row + length) of the step hold tokens [start, start + length) of one sequence."""

    owner: Hashable  # the sequence; failures are reported against it
    adapter: Adapter | None
    positions: list[list[int]]  # edited prompt positions per intervention index
    row: int
    start: int
    length: int


@dataclass
class PlanGroup:
    intervention: Intervention
    rows: Tensor
    owners: list[Hashable]


@dataclass
class InterventionPlan:
    layers: dict[int, list[PlanGroup]]
    failures: dict[Hashable, str] = field(default_factory=dict)

    def apply(self, layer: int, hidden: Tensor) -> None:
        """Edit the rows of `hidden` [T, d] in place. A failing group fails its owners only."""
        for group in self.layers.get(layer, ()):
            try:
                edited = group.intervention(hidden.index_select(0, group.rows))
                hidden.index_copy_(0, group.rows, edited)
            except Exception as e:  # one adapter's fault must not take down the step
                for owner in group.owners:
                    self.failures.setdefault(owner, f"adapter {type(e).__name__}: {e}")


def build_plan(chunks: list[Chunk], device: torch.device | str) -> InterventionPlan | None:
    rows: dict[tuple[int, int], list[int]] = {}  # (id of adapter, index) -> rows
    owners: dict[tuple[int, int], list[Hashable]] = {}
    adapters: dict[int, Adapter] = {}
    for chunk in chunks:
        if chunk.adapter is None:
            continue
        end = chunk.start + chunk.length
        for index, positions in enumerate(chunk.positions):
            hit = [chunk.row + p - chunk.start for p in positions if chunk.start <= p < end]
            if hit:
                key = (id(chunk.adapter), index)
                adapters[id(chunk.adapter)] = chunk.adapter
                rows.setdefault(key, []).extend(hit)
                owners.setdefault(key, []).append(chunk.owner)
    if not rows:
        return None
    layers: dict[int, list[PlanGroup]] = {}
    for (adapter_id, index), row_list in rows.items():
        row_tensor = torch.tensor(row_list, dtype=torch.long, device=device)
        for layer, interventions in adapters[adapter_id].layers.items():
            layers.setdefault(layer, []).append(
                PlanGroup(interventions[index], row_tensor, owners[(adapter_id, index)])
            )
    return InterventionPlan(layers)
