"""Forward hooks on every decoder layer that apply the step's intervention plan in place.

The engine passes the plan as a forward kwarg (PLAN_KWARG); transformers hands forward kwargs to
each decoder layer, so the hook reads it from there and needs no shared state. Without a plan (decode
steps, requests without adapters) a hook returns at once.
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from server.reft.layers import decoder_layers
from server.reft.plan import InterventionPlan

PLAN_KWARG = "reft_plan"
HANDLES_ATTRIBUTE = "_reft_plan_hook_handles"


def _make_hook(layer: int):
    def hook(module, args, kwargs, output):
        plan: InterventionPlan | None = kwargs.get(PLAN_KWARG)
        if plan is None or layer not in plan.layers:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        plan.apply(layer, hidden.view(-1, hidden.shape[-1]))
        return

    return hook


def install_plan_hooks(model: nn.Module) -> list[RemovableHandle]:
    """Hook every decoder layer once; several engines over one model must not stack hooks."""
    installed = getattr(model, HANDLES_ATTRIBUTE, None)
    if installed is None:
        installed = [
            block.register_forward_hook(_make_hook(layer), with_kwargs=True)
            for layer, block in enumerate(decoder_layers(model))
        ]
        setattr(model, HANDLES_ATTRIBUTE, installed)
    return installed
