"""The slow reference generator: the yardstick the engine is compared against (tests, trainer evaluation).

One request at a time on a plain transformers model (sdpa attention, its own KV cache): the prompt
forward runs with forward hooks that apply the adapter at its prompt positions, then decoding runs
the unmodified model. This is exactly pyreft's generation semantics, with nothing of the engine.
"""

from __future__ import annotations

from typing import Protocol

import torch

from server.reft.adapter import Adapter
from server.reft.batch_edit import batch_edit_kwargs, raise_edit_failures
from server.reft.hf_cache import cache_argument, returned_cache


class Constraint(Protocol):
    """What a structured output allows next (a bool per vocabulary entry), and taking a token: whether
    the output is then complete."""

    def allowed(self) -> torch.Tensor: ...

    def accept(self, token: int) -> bool: ...


@torch.no_grad()
def reference_generate(
    model,
    prompt_ids: list[int],
    adapter: Adapter | None = None,
    *,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
    constraint: Constraint | None = None,
) -> list[int]:
    """Greedy tokens after `prompt_ids` (BOS included, as served), at most `max_new_tokens`; with a
    `constraint`, only tokens it allows, until it is complete."""
    device = next(model.parameters()).device
    out = _prompt_forward(model, prompt_ids, adapter)
    past, logits = returned_cache(out), out.logits[0, -1]
    carry = cache_argument(model)
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        if constraint is not None:
            logits = logits.masked_fill(~constraint.allowed(), float("-inf"))
        token = int(logits.argmax())
        tokens.append(token)
        if token == eos_token_id or (constraint is not None and constraint.accept(token)):
            break
        out = model(torch.tensor([[token]], device=device), use_cache=True, **{carry: past})
        past, logits = returned_cache(out), out.logits[0, -1]
    return tokens


@torch.no_grad()
def reference_prompt_logprobs(model, prompt_ids: list[int], adapter: Adapter | None = None) -> torch.Tensor:
    """[len(prompt_ids) - 1, vocab] float32: the log-distribution each prompt position gives the next token."""
    logits = _prompt_forward(model, prompt_ids, adapter).logits[0, :-1]
    return logits.float().log_softmax(dim=-1)


def _prompt_forward(model, prompt_ids: list[int], adapter: Adapter | None):
    """The prompt's forward, the adapter applied at its positions by hooks; the output keeps its KV cache."""
    edit = {}
    if adapter is not None:
        edit = batch_edit_kwargs(model, adapter.layers, [adapter.positions(len(prompt_ids))], len(prompt_ids))
    out = model(torch.tensor([prompt_ids], device=next(model.parameters()).device), use_cache=True, **edit)
    raise_edit_failures(edit)
    return out
