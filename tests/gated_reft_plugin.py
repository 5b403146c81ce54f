"""An intervention type defined outside the server package, as a user's plugin would be: LoReFT whose
low-rank update passes through a learned per-dimension gate, sigmoid(g). Its parameters have names of
their own (`basis` is its orthonormal R', `gate` is new), and it says where a pyreft-style checkpoint
keeps each one: everything the server does with a type (training, validation, pyreft import, random
adapters, serving) must follow from this table row alone.

    reft-server serve --plugins tests.gated_reft_plugin ...
    reft-server train --plugins tests.gated_reft_plugin --type gatedreft ...
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from server.reft.interventions import (
    Activation,
    InterventionType,
    Params,
    ParamSpec,
    linear,
    linear_bias_init,
    linear_weight_init,
    orthogonal_init,
    register_intervention_type,
)


def gated_reft(h: Tensor, p: Params, act: Activation) -> Tensor:
    """h + sigmoid(g) * (act(W h + b) - h R') R'^T; works alone and on stacked segments alike."""
    basis = p["basis"]
    rotated = h.to(basis.dtype) @ basis
    update = (act(linear(h, p["source_weight"], p["source_bias"])) - rotated) * torch.sigmoid(p["gate"])
    return (h + update @ basis.mT).to(h.dtype)


def zero_init(tensor: Tensor, dims) -> Tensor:  # sigmoid(0) = 0.5: the gate starts half open
    return nn.init.zeros_(tensor)


GATED_REFT = register_intervention_type(
    InterventionType(
        "gatedreft",
        gated_reft,
        (
            ParamSpec(
                "basis", ("d", "r"), orthogonal_init, fp32=True, orthonormal=True, pyreft_names=("rotate_layer",)
            ),
            ParamSpec("source_weight", ("r", "d"), linear_weight_init, pyreft_names=("learned_source.weight",)),
            ParamSpec("source_bias", ("r",), linear_bias_init, pyreft_names=("learned_source.bias",)),
            ParamSpec("gate", ("r",), zero_init, fp32=True, pyreft_names=("gate_logits",)),
        ),
        pyreft_class="GatedReftIntervention",
    )
)
