"""One adapter's edit on a plain transformers forward over a padded [B, T] batch (no engine involved).

The trainer, the slow reference generator and the benchmarks' pyreft-style baseline each run one
forward over a batch edited by a single adapter, at given positions per row. The batch's rows,
flattened, are edited by the same step plan the engine builds (plan.py) through the same hooks
(hooks.py): serving, training and the yardstick share one edit loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from server.reft.hooks import PLAN_KWARG, install_plan_hooks, plan_kwargs
from server.reft.interventions import Intervention
from server.reft.plan import EditedRows, build_plan

Layers = Mapping[int, Sequence[Intervention]]  # layer -> interventions by index (#0, #1)


@dataclass(frozen=True)
class _Interventions:
    layers: Layers


def batch_edit_kwargs(
    model: nn.Module, layers: Layers, positions: Sequence[Sequence[Sequence[int]]], width: int
) -> dict:
    """Forward kwargs that make the next forward of `model` over a [len(positions), width] batch edit
    positions[b][k] of row b with intervention #k of every layer in `layers`. Pass them to that one
    forward only: a later forward (decoding) must run unedited."""
    install_plan_hooks(model)
    source = _Interventions(layers)
    pieces = [
        EditedRows(b, source, tuple(tuple(b * width + p for p in index) for index in row), b * width, width)
        for b, row in enumerate(positions)
    ]
    return plan_kwargs(build_plan(pieces, next(model.parameters()).device))


def raise_edit_failures(edit: dict) -> None:
    """After the forward `edit` went to: raise what an intervention raised. The plan keeps a faulty
    adapter from failing a whole served step; a forward of one adapter (training, the reference)
    must fail instead of going on unedited."""
    plan = edit.get(PLAN_KWARG)
    if plan is not None and plan.failures:
        raise RuntimeError(next(iter(plan.failures.values())))
