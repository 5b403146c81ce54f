"""Check a trained adapter the way the server would serve it: the reference generator, greedy."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from server.adapters.format import AdapterFile
from server.adapters.materialize import materialize
from server.reft.reference import reference_generate
from server.training.data import Example


def greedy_completions(
    model: nn.Module,
    adapter: AdapterFile | None,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """Greedy tokens after each prompt with `adapter` applied (None: the base model)."""
    parameter = next(model.parameters())
    served = None
    if adapter is not None:
        served = materialize(adapter, name="evaluation", dtype=parameter.dtype, device=parameter.device)
    return [
        reference_generate(model, list(prompt), served, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        for prompt in prompts
    ]


def reproduced(
    model: nn.Module, adapter: AdapterFile | None, examples: Sequence[Example], eos_token_id: int
) -> list[bool]:
    """For each example: does greedy generation give exactly its completion (EOS included)?"""
    longest = max(len(e.completion_ids) for e in examples)
    generated = greedy_completions(
        model, adapter, [e.prompt_ids for e in examples], max_new_tokens=longest, eos_token_id=eos_token_id
    )
    return [tokens == list(e.completion_ids) for tokens, e in zip(generated, examples, strict=True)]
