"""Structured outputs in the engine: a request held to a grammar (JSON schema, regex, choices) draws
only what the grammar allows and ends when it is complete, token for token as the slow reference that
masks each greedy step with a matcher of its own; next to plain and adapter requests, which it changes
in nothing, with async scheduling as without."""

import json

import llguidance
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from server.engine.grammar import Grammars
from server.engine.sequence import FinishReason
from server.reft.reference import reference_generate
from tests.conftest import load_reference_model
from tests.engine_utils import load_engine_model, make_core, prompt, random_adapter, run_core, seq

EOS = 2
ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
GRAMMARS = {
    "schema": llguidance.LLMatcher.grammar_from_json_schema(json.dumps({**ANSWER, "additionalProperties": False})),
    "regex": llguidance.LLMatcher.grammar_from_regex("[0-9]{2,4}"),
    "choice": llguidance.grammar_from("lark", 'start: "red" | "green" | "blue, \\"dark\\""'),
}


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """(engine model, reference model, tokenizer, the engine's Grammars) of the tiny Llama."""
    directory = tiny_model_dir("llama")
    model = load_engine_model(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, load_reference_model(directory), tokenizer, Grammars(tokenizer, model.config.vocab_size, {EOS})


class ReferenceGrammar:
    """The reference's constraint: a matcher of its own, its mask read whole and unpacked on the host."""

    def __init__(self, tokenizer, grammar: str, vocab: int):
        self.matcher = llguidance.LLMatcher(
            llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=EOS), grammar
        )
        self.vocab = vocab

    def allowed(self) -> torch.Tensor:
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint32)
        bits = [(int(words[t // 32]) >> (t % 32)) & 1 for t in range(self.vocab)]
        return torch.tensor(bits, dtype=torch.bool)

    def accept(self, token: int) -> bool:
        assert self.matcher.consume_token(token)
        return self.matcher.is_stopped()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_constrained_requests_in_a_mixed_batch_equal_the_reference(served, async_scheduling):
    model, reference_model, tokenizer, grammars = served
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    adapter = random_adapter("a", "loreft", (0, 2), 4, "f3+l3", hidden, seed=3)
    requests = [  # (id, prompt, adapter, grammar)
        *[(f"g-{name}", prompt(9 + i, i), adapter if i % 2 else None, name) for i, name in enumerate(GRAMMARS)],
        ("g-schema-2", prompt(30, 7), adapter, "schema"),
        ("plain", prompt(12, 8), None, None),
        ("plain-adapter", prompt(20, 9), adapter, None),
    ]
    core = make_core(model, eos={EOS}, grammars=grammars, max_batched_tokens=24, async_scheduling=async_scheduling)
    finished: dict = {}
    sequences = [seq(rid, p, a, max_new_tokens=48, grammar=GRAMMARS.get(name)) for rid, p, a, name in requests]
    tokens = run_core(core, [(s, i % 3) for i, s in enumerate(sequences)], finished=finished)
    for rid, prompt_ids, a, name in requests:
        constraint = ReferenceGrammar(tokenizer, GRAMMARS[name], vocab) if name else None
        expected = reference_generate(
            reference_model, prompt_ids, a, max_new_tokens=48, eos_token_id=EOS, constraint=constraint
        )
        assert tokens[rid] == expected, rid
        if name is not None and expected[-1] != EOS and len(expected) < 48:
            assert finished[rid][0] is FinishReason.STOP  # complete: nothing may follow


def test_a_complete_grammar_ends_the_request_with_text_it_matches(served):
    model, _, tokenizer, grammars = served
    core = make_core(model, eos={EOS}, grammars=grammars)
    requests = [
        (seq(f"{name}-{i}", prompt(10, i), max_new_tokens=64, temperature=1.0, seed=i, grammar=g), 0)
        for name, g in GRAMMARS.items()
        for i in range(3)
    ]
    finished: dict = {}
    tokens = run_core(core, requests, finished=finished)
    for request_id, ids in tokens.items():
        text = tokenizer.decode([t for t in ids if t != EOS])
        if request_id.startswith("choice"):
            assert text in ("red", "green", 'blue, "dark"') and finished[request_id][0] is FinishReason.STOP
        elif request_id.startswith("regex"):
            assert text.isdigit() and 2 <= len(text) <= 4 and finished[request_id][0] is FinishReason.STOP
        elif finished[request_id][0] is FinishReason.STOP:  # a sampled JSON may run out of tokens first
            assert json.loads(text)["answer"] in ("yes", "no")


def test_a_grammar_that_does_not_compile_is_refused_when_added(served):
    model, _, _, grammars = served
    core = make_core(model, eos={EOS}, grammars=grammars)
    with pytest.raises(ValueError, match="structured output"):
        core.add(seq("bad", prompt(5, 0), grammar='{"grammars": [{"lark_grammar": "start: missing_rule"}]}'))
    assert not core.has_work()


def test_without_a_grammar_reader_structured_outputs_are_refused(served):
    model, _, _, _ = served
    core = make_core(model, eos={EOS})
    with pytest.raises(ValueError, match="structured outputs are not available"):
        core.add(seq("g", prompt(5, 0), grammar=GRAMMARS["regex"]))
