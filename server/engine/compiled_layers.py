"""The eager steps' decoder layers, compiled (`--compile`): regional compilation.

No graph replays a step that prefills or edits (cuda_graphs.py replays decode-only steps), so such a step
runs the model's forward eagerly: each layer's norms, rotary embeddings, activation and residual adds are
dozens of small kernels, launched one by one from Python, over every token of the step. With a compile
backend each decoder layer's forward is compiled instead, dynamic in the step's tokens. The layers share
their code and get their index as an argument (attention.py's LAYER_KWARG), so one compilation serves
all of them (a second one serves steps of a single token, which torch.compile specializes; layers that
differ in a constant such as their sliding window compile apart). Only the layer's own forward is
compiled: its forward hooks, which apply ReFT's edits between layers (reft/hooks.py), run as they are,
and attention is attention.py's opaque op, which finds the step through `compiled_step`.

A compiled layer runs the compiled forward only when its caller asks, with `COMPILED_KWARG`: another
engine over the same model without a compile backend, or a reference forward, gets the plain layer; so
does the decode graphs' whole forward, which torch.compile traces as one graph of its own. If compiling
fails, the error is logged once and every layer of the model runs plain from then on.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch._dynamo.exc import TorchDynamoException
from torch.fx.experimental import _config as shape_config

from server.engine.attention import LAYER_KWARG, STEP_KWARG, compiled_step
from server.reft.hooks import PLAN_KWARG
from server.reft.layers import decoder_layers

log = logging.getLogger(__name__)

COMPILED_KWARG = "reft_compiled_layers"
_ATTRIBUTE = "_reft_compiled_layers"
RECOMPILE_LIMIT = 64


class CompiledLayers:
    """A model's decoder layers, each given a forward that runs compiled with `backend` when asked."""

    def __init__(self, layers: nn.ModuleList, plain_forwards: list, backend: str):
        self.plain_forwards = plain_forwards  # the layers' own forwards, bound methods
        self.backend = backend
        self.failed = False
        for index, (layer, plain) in enumerate(zip(layers, plain_forwards, strict=True)):
            layer.forward = self._forward(plain, index)

    def _forward(self, plain, index: int):
        compiled = torch.compile(plain, backend=self.backend, dynamic=True)

        def forward(*args, **kwargs):
            if not kwargs.pop(COMPILED_KWARG, False) or self.failed:
                return plain(*args, **kwargs)
            # the step and the plan are new objects every step: Dynamo would guard on them and recompile, so
            # they stay out (the hooks read the plan from the call's own kwargs, attention the step from here)
            layer_kwargs = {k: v for k, v in kwargs.items() if k not in (STEP_KWARG, PLAN_KWARG)}
            try:
                with compiled_step(kwargs[STEP_KWARG]):
                    return compiled(*args, **layer_kwargs, **{LAYER_KWARG: index})
            except TorchDynamoException:  # raised while compiling: the plain layer redoes whatever part ran
                log.exception("compiling the decoder layers with %s failed: they run uncompiled", self.backend)
                self.failed = True
                return plain(*args, **kwargs)

        return forward


def compile_layers(model: nn.Module, backend: str) -> CompiledLayers:
    """The model's layers compiled with `backend`: made on the first call, kept while later calls ask for the
    same backend, made anew from the layers' own forwards for another one."""
    current: CompiledLayers | None = getattr(model, _ATTRIBUTE, None)
    if current is not None and current.backend == backend:
        return current
    # every model (its shapes, dtype) compiled in a process adds at least two entries (more with per-layer
    # sliding windows) to the cache of the one layer code that the model families share; past the limit (8
    # by default) torch.compile runs the layers eagerly, with a warning
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # its name before 2.7
    setattr(dynamo, limit, max(getattr(dynamo, limit), RECOMPILE_LIMIT))
    layers = decoder_layers(model)
    plain_forwards = current.plain_forwards if current is not None else [layer.forward for layer in layers]
    compiled = CompiledLayers(layers, plain_forwards, backend)
    setattr(model, _ATTRIBUTE, compiled)
    return compiled


def first_compilation():
    """Where the compiled layers are first run (the engine's warm-up steps): there the step's token count
    gets a symbol of its own. By default torch.compile gives input sizes of equal value one symbol, so a
    step of as many tokens as the model's hidden size would make the count a constant of the compiled code,
    and the next step of another size would compile it again."""
    return shape_config.patch(use_duck_shape=False)
