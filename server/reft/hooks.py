"""Forward hooks on every decoder layer that apply the step's intervention plan in place.

The plan travels as a forward kwarg (`plan_kwargs`: from the engine's model runner, and from
batch_edit.py for the trainer and the reference); transformers hands forward kwargs to each decoder
layer, so the hook reads it from there and needs no shared state. Without a plan (decode
steps, requests without adapters) a hook returns at once. The last layer's hook also records which
rows are finite, so a request whose edit blew up its hidden states fails alone.
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from server.reft.layers import decoder_layers
from server.reft.plan import InterventionPlan

PLAN_KWARG = "reft_plan"
HANDLES_ATTRIBUTE = "_reft_plan_hook_handles"


def _make_hook(layer: int, last: bool):
    def hook(module, args, kwargs, output):
        plan: InterventionPlan | None = kwargs.get(PLAN_KWARG)
        if plan is None:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        rows = hidden.view(-1, hidden.shape[-1])
        plan.apply(layer, rows)
        if last:
            plan.check_finite(rows)

    return hook


def install_plan_hooks(model: nn.Module) -> list[RemovableHandle]:
    """Hook every decoder layer once; several engines over one model must not stack hooks."""
    installed = getattr(model, HANDLES_ATTRIBUTE, None)
    if installed is None:
        blocks = decoder_layers(model)
        installed = [
            block.register_forward_hook(_make_hook(layer, last=layer == len(blocks) - 1), with_kwargs=True)
            for layer, block in enumerate(blocks)
        ]
        setattr(model, HANDLES_ATTRIBUTE, installed)
    return installed


def plan_kwargs(plan: InterventionPlan | None) -> dict:
    """The forward kwargs that hand `plan` to the hooks: none without a plan."""
    return {PLAN_KWARG: plan} if plan is not None else {}
