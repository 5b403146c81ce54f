"""The engine serves whatever a RequestEdit says to edit, with no change of its own: here an edit rule
that also edits generated (decode) positions, which no adapter spec can express today. Scheduler,
KV cache, prefix cache and model runner are untouched by it, and the tokens equal a slow reference
that recomputes the whole sequence with the edit at every step."""

import pytest
import torch

from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from server.reft.batch_edit import batch_edit_kwargs
from server.reft.request_edit import RequestEdit
from tests.engine_utils import make_core, prompt, random_adapter, run_core

NEW_TOKENS = 10


def with_decode_positions(edit: RequestEdit, decode_positions: tuple[int, ...]) -> RequestEdit:
    positions = tuple(tuple(sorted({*index, *decode_positions})) for index in edit.positions)
    return RequestEdit(edit.adapter, positions)


@torch.no_grad()
def recomputed_generate(model, prompt_ids: list[int], edit: RequestEdit) -> list[int]:
    """Greedy tokens, each from a full forward of the sequence so far with every edited position
    that exists yet edited: no cache, nothing shared with the engine but the step plan's formulas."""
    tokens = list(prompt_ids)
    while len(tokens) < len(prompt_ids) + NEW_TOKENS:
        positions = [[[p for p in index if p < len(tokens)] for index in edit.positions]]
        kwargs = batch_edit_kwargs(model, edit.adapter.layers, positions, len(tokens))
        logits = model(torch.tensor([tokens]), use_cache=False, **kwargs).logits[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt_ids) :]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_an_edit_rule_on_decode_positions_is_served_without_engine_changes(models, prefix_caching):
    engine_model, reference_model = models
    hidden = engine_model.config.hidden_size
    adapter = random_adapter("steer", "loreft", (0, 2), 4, "f1+l1", hidden, True, seed=3)
    core = make_core(engine_model, prefix_caching=prefix_caching, max_batched_tokens=16)
    requests, expected = [], {}
    for i, length in enumerate((5, 11, 23)):
        ids = prompt(length, i)
        edit = with_decode_positions(RequestEdit.for_prompt(adapter, length), (length + 1, length + 4))
        sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        requests.append((Sequence(f"r{i}", ids, sampling, edit), i))
        expected[f"r{i}"] = recomputed_generate(reference_model, ids, edit)
    plain = RequestEdit.for_prompt(adapter, 11)
    requests.append((Sequence("plain", prompt(11, 1), sampling, plain), 0))
    generated = run_core(core, requests)
    assert {rid: generated[rid] for rid in expected} == expected
    # the same prompt and adapter with prompt-only edits shares no decode edits: its tokens differ
    assert generated["plain"] != generated["r1"]


def test_a_twin_of_a_request_edited_while_it_decodes_waits_only_for_its_prompt(models):
    """With async scheduling a request whose edits go on into its decode steps keeps its blocks out of the
    prefix cache (each step's edit check is read a step later) for as long as it runs: a request for the
    same prompt and edit waits for them no longer than its prompt's steps, and those behind it neither."""
    engine_model, reference_model = models
    hidden = engine_model.config.hidden_size
    adapter = random_adapter("steer", "loreft", (0, 2), 4, "f1+l1", hidden, True, seed=3)
    ids = prompt(40, 1)
    edit = with_decode_positions(RequestEdit.for_prompt(adapter, 40), tuple(range(40, 40 + NEW_TOKENS)))
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    core = make_core(engine_model, block_size=8, async_scheduling=True)
    core.add(Sequence("leader", ids, sampling, edit))
    core.step()
    core.add(Sequence("twin", ids, sampling, edit))
    core.add(Sequence("behind", prompt(10, 2), sampling))
    twin = []
    for _ in range(3):
        twin += [t for output in core.step() if output.request_id == "twin" for t in output.new_tokens]
    assert not core.scheduler.waiting
    assert twin + run_core(core, [])["twin"] == recomputed_generate(reference_model, ids, edit)
