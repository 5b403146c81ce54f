"""An intervention type defined outside the server package, as a user's plugin would be: LoReFT whose
low-rank update passes through a learned per-dimension gate, sigmoid(g) (a parameter of its own).

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
    rotation = p["rotation"]
    rotated = h.to(rotation.dtype) @ rotation
    update = (act(linear(h, p["weight"], p["bias"])) - rotated) * torch.sigmoid(p["gate"])
    return (h + update @ rotation.mT).to(h.dtype)


def zero_init(tensor: Tensor, dims) -> Tensor:  # sigmoid(0) = 0.5: the gate starts half open
    return nn.init.zeros_(tensor)


GATED_REFT = register_intervention_type(
    InterventionType(
        "gatedreft",
        gated_reft,
        (
            ParamSpec("rotation", ("d", "r"), orthogonal_init, fp32=True, orthonormal=True),
            ParamSpec("weight", ("r", "d"), linear_weight_init),
            ParamSpec("bias", ("r",), linear_bias_init),
            ParamSpec("gate", ("r",), zero_init, fp32=True),
        ),
    )
)
