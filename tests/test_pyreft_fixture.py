"""Real pyreft checkpoints of all six types reproduce pyreft's own greedy outputs (54 of 54)."""

import json

import pytest

from server.adapters.materialize import materialize
from server.adapters.model_shape import ModelShape
from server.adapters.pyreft import import_pyreft
from server.reft.adapter import Adapter
from server.reft.reference import reference_generate
from server.tokenization import encode_prompt
from tests.conftest import FIXTURE

CASES = json.loads((FIXTURE / "expected.json").read_text())["cases"]
MAX_NEW_TOKENS = json.loads((FIXTURE / "expected.json").read_text())["max_new_tokens"]


def import_fixture_adapter(name: str) -> Adapter:
    directory = FIXTURE / "adapters" / name
    recorded = json.loads((directory / "positions.json").read_text())
    first, last = recorded["first"], recorded["last"]
    positions = "+".join(p for p in (first and f"f{first}", last and f"l{last}") if p)
    adapter_file = import_pyreft(
        directory,
        positions=positions,
        share_weights=recorded["share_weights"],
        model=ModelShape(num_layers=6, hidden_size=192),
    )
    assert list(adapter_file.config.layers) == recorded["layers"]
    assert adapter_file.config.rank == recorded["rank"]
    return materialize(adapter_file, name=name)


def sorted_key_positions(adapter: Adapter, name: str, prompt_len: int) -> list[list[int]]:
    """Our positions laid out in the checkpoint's sorted_keys order, as expected.json records them."""
    config = json.loads((FIXTURE / "adapters" / name / "config.json").read_text())
    per_index = adapter.positions(prompt_len)
    return [per_index[int(key.rsplit("#", 1)[1])] for key in config["sorted_keys"]]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['adapter']}-{len(c['prompt_ids'])}" for c in CASES])
def test_reproduces_pyreft_generation(pyreft_fixture, case):
    model, tokenizer, _ = pyreft_fixture
    adapter = import_fixture_adapter(case["adapter"])
    assert sorted_key_positions(adapter, case["adapter"], len(case["prompt_ids"])) == case["positions"]
    assert encode_prompt(tokenizer, case["prompt"]) == case["prompt_ids"]
    steered = reference_generate(model, case["prompt_ids"], adapter, max_new_tokens=MAX_NEW_TOKENS)
    assert steered == case["adapter_tokens"]
    assert reference_generate(model, case["prompt_ids"], None, max_new_tokens=MAX_NEW_TOKENS) == case["base_tokens"]
