"""Per-step intervention plan: every adapter edit of a step as one batched call per layer and type.

A step packs many sequences into one row of T tokens. The rows each request's chunk must edit (its
`EditedRows`, made by request_edit.py) are collected per (adapter, intervention index): a *pair*.
Per layer, the pairs whose interventions share a type, activation and parameter shapes form one
`EditBatch`: their rows are gathered into segments of equal length M ([S, M, d], padded; a long pair
spans several segments), their parameters are stacked along S (once per step for every layer the group
edits), and the type's formula runs once over all of them (the batched form in interventions.py, as
Punica/S-LoRA do for LoRA), or its fused form where it has one (LoReFT on CUDA: one kernel that edits
the rows in place). So a step with 64 adapters costs a handful of launches per layer, not 64 groups of
them. The trainer, the reference and the baselines run the same plan over a padded batch's rows
(batch_edit.py).

A failing batch is retried segment by segment, so an exception fails only the requests whose
segment raised (`failures`). Rows whose hidden states are not finite after the last layer fail their
request (`non_finite_owners`, once the engine has read `finite_rows`): a poisoned adapter's tokens
are never emitted, and its K/V never reach anyone else.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from server.reft.interventions import Intervention, stack_params


class EditSource(Protocol):
    """What edits a group of rows: an adapter, or a trainer's live interventions."""

    layers: Mapping[int, Sequence[Intervention]]  # layer -> interventions by index (#0, #1)


@dataclass(frozen=True)
class EditedRows:
    """The rows of one step that one request's chunk edits: rows[k] are edited by intervention #k of
    every layer of `adapter`. The chunk itself is rows [first_row, first_row + length)."""

    owner: Hashable  # the request; failures are reported against it
    adapter: EditSource | None  # None only on the wire to a tensor-parallel follower
    rows: tuple[tuple[int, ...], ...]
    first_row: int
    length: int


@dataclass
class _Pair:
    """The rows of one step that one intervention index of one adapter edits."""

    adapter: EditSource
    index: int
    rows: list[int] = field(default_factory=list)
    owners: list[Hashable] = field(default_factory=list)

    def batch_key(self, layer: int, rows_once: bool) -> tuple:
        """Pairs with equal keys run as one batch: same type, activation and parameter shapes. The key leads
        with the index where a row is edited by both #0 and #1 (a one-sided spec without shared weights, which
        pyreft checkpoints may have): #1 must see what #0 made of it, so every #0 runs first. Where the step
        edits each row once (`rows_once`: two-sided specs split a prompt's positions between #0 and #1), they
        edit apart and batch together."""
        return (0 if rows_once else self.index, self.adapter.layers[layer][self.index].batch_shape)


class _Stack:
    """The parameters of one layout's segments at every layer it edits with one batch shape, stacked on first use
    as [layers, S, ...] per name (`stack_params`): a few launches per step, not a few per layer."""

    def __init__(self, interventions: list[list[Intervention]]):
        self.interventions = interventions  # per layer position, per segment
        self._params: dict[str, Tensor] | None = None

    def params(self) -> dict[str, Tensor]:
        if self._params is None:
            flat = stack_params([iv.params for layer in self.interventions for iv in layer])
            shape = (len(self.interventions), len(self.interventions[0]))
            self._params = {name: tensor.view(*shape, *tensor.shape[1:]) for name, tensor in flat.items()}
        return self._params


@dataclass
class EditBatch:
    """Segments of rows edited together at one layer: segment s by `interventions[s]`."""

    stack: _Stack
    layer_index: int  # this layer's position in the stack
    gather: Tensor  # [S, M] rows of the step (padding repeats a row of the segment)
    valid: Tensor  # positions in the flattened [S * M] that are real rows
    targets: Tensor  # the step rows those positions are written back to
    owners: list[list[Hashable]]  # per segment

    @property
    def interventions(self) -> list[Intervention]:
        return self.stack.interventions[self.layer_index]

    def apply(self, hidden: Tensor, fused: bool = True) -> None:
        """Edit the batch's rows of `hidden` [T, d] in place: through the type's fused kernel if `fused` and it
        takes them, else the type's formula."""
        segments, length = self.gather.shape
        first = self.interventions[0]
        if (
            fused
            and first.kind.fused is not None
            and first.kind.fused(
                hidden, self.targets, self.valid, length, self.stack.params, self.layer_index, first.act
            )
        ):
            return
        if segments == 1:  # one adapter: the plain form, which rounds exactly as the reference path does
            hidden.index_copy_(0, self.targets, first(hidden.index_select(0, self.targets)))
            return
        x = hidden.index_select(0, self.gather.flatten()).view(segments, length, -1)
        params = {name: stacked[self.layer_index] for name, stacked in self.stack.params().items()}
        edited = first.kind.apply(x, params, first.act)
        hidden.index_copy_(0, self.targets, edited.flatten(0, 1).index_select(0, self.valid))

    def apply_one_by_one(self, hidden: Tensor, failures: dict[Hashable, str]) -> None:
        """The slow path after the batch raised: each segment alone, so a fault stays with its owners."""
        length = self.gather.shape[1]
        for s, intervention in enumerate(self.interventions):
            valid = self.valid[(self.valid >= s * length) & (self.valid < (s + 1) * length)]
            rows = self.gather.flatten().index_select(0, valid)
            try:
                hidden.index_copy_(0, rows, intervention(hidden.index_select(0, rows)))
            except Exception as e:  # one adapter's fault must not take down the step
                for owner in self.owners[s]:
                    failures.setdefault(owner, f"adapter {type(e).__name__}: {e}")


@dataclass
class InterventionPlan:
    layers: dict[int, list[EditBatch]]
    owner_rows: list[tuple[Hashable, int, int]]  # (owner, first row, rows) of every edited chunk
    fused: bool = True  # edit through the types' fused kernels where they take the rows
    failures: dict[Hashable, str] = field(default_factory=dict)
    finite_rows: Tensor | None = None  # [T] after the last layer

    def apply(self, layer: int, hidden: Tensor) -> None:
        """Edit the rows of `hidden` [T, d] in place."""
        for batch in self.layers.get(layer, ()):
            try:
                batch.apply(hidden, self.fused)
            except Exception:
                batch.apply_one_by_one(hidden, self.failures)

    def check_finite(self, hidden: Tensor) -> None:
        """Record which rows are finite after the model's last layer (no host sync here)."""
        self.finite_rows = torch.isfinite(hidden).all(dim=-1)

    @property
    def owners(self) -> list[Hashable]:
        """Every owner whose rows this plan edits."""
        return [owner for owner, _, _ in self.owner_rows]

    def non_finite_owners(self, finite: list[bool]) -> dict[Hashable, str]:
        """Owners whose rows were not all finite after the last layer, with why; `finite` is `finite_rows`
        as read on the host (the caller chooses when to wait for it)."""
        return {
            owner: "the adapter's edit made the hidden states non-finite (NaN or infinity)"
            for owner, row, length in self.owner_rows
            if not all(finite[row : row + length])
        }


def _pairs(pieces: list[EditedRows]) -> tuple[list[_Pair], list[tuple[Hashable, int, int]]]:
    pairs: dict[tuple[int, int], _Pair] = {}
    owner_rows = []
    for piece in pieces:
        for index, rows in enumerate(piece.rows):
            if rows:
                pair = pairs.setdefault((_identity(piece.adapter), index), _Pair(piece.adapter, index))
                pair.rows.extend(rows)
                pair.owners.append(piece.owner)
        if any(piece.rows):
            owner_rows.append((piece.owner, piece.first_row, piece.length))
    return list(pairs.values()), owner_rows


def _identity(adapter: EditSource) -> Hashable:
    """Adapters of equal content (a digest) are one: a tensor-parallel follower holds one copy of what rank 0
    may hold twice (two names, or a reload), and both must lay out and round the step alike."""
    return getattr(adapter, "digest", None) or id(adapter)


def _segment_length(pairs: list[_Pair]) -> int:
    """The median pair size: short pairs waste under half their segment, long ones span several."""
    sizes = sorted(len(pair.rows) for pair in pairs)
    return sizes[len(sizes) // 2]


@dataclass(frozen=True)
class _Segments:
    """How a group of pairs is laid out as [S, M] rows; the same at every layer the group edits."""

    pairs: list[_Pair]  # per segment
    gather: Tensor
    valid: Tensor
    targets: Tensor


IndexTensor = Callable[[list], Tensor]  # a list of row indices as a long tensor on the plan's device


def _segments(pairs: list[_Pair], tensor: IndexTensor) -> _Segments:
    length = _segment_length(pairs)
    segment_pairs, gather, valid, targets = [], [], [], []
    for pair in pairs:
        for begin in range(0, len(pair.rows), length):
            rows = pair.rows[begin : begin + length]
            base = len(gather) * length
            segment_pairs.append(pair)
            valid.extend(range(base, base + len(rows)))
            targets.extend(rows)
            gather.append(rows + [rows[0]] * (length - len(rows)))
    return _Segments(segment_pairs, tensor(gather), tensor(valid), tensor(targets))


def build_plan(
    pieces: list[EditedRows], device: torch.device | str, index_tensor: IndexTensor | None = None, fused: bool = True
) -> InterventionPlan | None:
    """One step's plan: every piece's rows edited, batched per layer and type; None if nothing is edited.
    `index_tensor` moves row indices to `device` (default: torch.tensor; the engine passes one that does
    not wait for the device's queued work). `fused`: through the types' fused kernels where they take the
    rows (on CUDA, LoReFT's: fused_loreft.py), else always through the types' formulas."""
    tensor = index_tensor or (lambda values: torch.tensor(values, dtype=torch.long, device=device))
    pairs, owner_rows = _pairs(pieces)
    if not pairs:
        return None
    rows = [row for pair in pairs for row in pair.rows]
    rows_once = len(set(rows)) == len(rows)
    groups: dict[tuple[int, tuple], list[_Pair]] = {}  # (layer, batch key) -> its pairs
    for pair in pairs:
        for layer in pair.adapter.layers:
            groups.setdefault((layer, pair.batch_key(layer, rows_once)), []).append(pair)
    # adapters usually share layers and shapes: lay out each group of pairs once, stack its parameters once
    layouts: dict[tuple[int, ...], _Segments] = {}
    stacked_layers: dict[tuple, list[int]] = {}  # (pairs, batch key) -> the layers that group edits
    for (layer, key), group in groups.items():
        ids = tuple(id(pair) for pair in group)
        if ids not in layouts:
            layouts[ids] = _segments(group, tensor)
        stacked_layers.setdefault((ids, key), []).append(layer)
    batches: dict[int, list[EditBatch]] = {}
    for (ids, key), layers in stacked_layers.items():
        segments = layouts[ids]
        stack = _Stack([[pair.adapter.layers[layer][pair.index] for pair in segments.pairs] for layer in layers])
        owners = [pair.owners for pair in segments.pairs]
        for position, layer in enumerate(layers):
            batch = EditBatch(stack, position, segments.gather, segments.valid, segments.targets, owners)
            batches.setdefault(layer, []).append((key[0], batch))
    # per layer, every #0 before any #1 (the batch key leads with the index)
    ordered = {
        layer: [batch for _, batch in sorted(found, key=lambda item: item[0])] for layer, found in batches.items()
    }
    return InterventionPlan(ordered, owner_rows, fused)
