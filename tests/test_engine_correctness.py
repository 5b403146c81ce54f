"""Token-for-token correctness of the engine: mixed batches equal each request served alone and the
slow reference generator, across adapters of every type, prompt lengths 1..300, staggered arrivals,
small chunked prefill, preemption, and four model families."""

import random

import pytest

from server.reft.reference import reference_generate
from tests.conftest import load_reference_model
from tests.engine_utils import load_engine_model, make_core, random_adapter, run_core, seq

ADAPTER_SPECS = [  # name, type, layers, rank, positions, share_weights
    ("lo_first_last", "loreft", (0,), 4, "f1+l1", True),
    ("lo_unshared", "loreft", (1, 3), 8, "f3+l3", False),
    ("lo_all_layers", "loreft", (0, 1, 2, 3), 2, "l2", True),
    ("lo_long_spec", "loreft", (1,), 4, "f7+l7", True),
    ("lo_explicit", "loreft", (2,), 4, "0,2,-1", True),
    ("no", "noreft", (2,), 4, "f2+l2", True),
    ("di_unshared", "direft", (1,), 4, "f1+l2", False),
    ("nodi", "nodireft", (3,), 8, "l3", True),
    ("cons", "consreft", (2,), 2, "f2+l2", True),
    ("lobi", "lobireft", (1,), 2, "l2", True),
]
PROMPT_LENGTHS = [1, 2, 3, 4, 5, 9, 17, 31, 64, 100, 129, 200, 300]


def make_adapters(hidden_size: int, num_layers: int = 4):
    adapters = []
    for i, (name, kind, layers, rank, positions, shared) in enumerate(ADAPTER_SPECS):
        layers = tuple(layer for layer in layers if layer < num_layers)
        adapters.append(random_adapter(name, kind, layers, rank, positions, hidden_size, shared, seed=i))
    return adapters


def make_workload(adapters, count: int, seed: int = 0):
    """(request id, prompt, adapter or None, arrival step) with every length and adapter represented."""
    rng = random.Random(seed)
    lengths = PROMPT_LENGTHS + [rng.randint(1, 300) for _ in range(count - len(PROMPT_LENGTHS))]
    choices = [*adapters, None, None]
    workload = []
    for i, length in enumerate(lengths[:count]):
        prompt = [1] + [rng.randrange(3, 259) for _ in range(length - 1)]
        workload.append((f"r{i}", prompt, choices[i % len(choices)], rng.randint(0, 30)))
    return workload


def check_mixed_batch(model_dir, count, max_new_tokens=8, **core_config):
    model = load_engine_model(model_dir)
    reference_model = load_reference_model(model_dir)
    adapters = make_adapters(model.config.hidden_size, model.config.num_hidden_layers)
    workload = make_workload(adapters, count)
    core = make_core(model, **core_config)
    mixed = run_core(core, [(seq(rid, p, a, max_new_tokens=max_new_tokens), t) for rid, p, a, t in workload])
    assert core.kv.num_free_blocks == core.kv.num_blocks
    steered = 0
    for rid, prompt, adapter, _ in workload:
        core.kv.reset_prefix_cache()  # alone means computed alone, not from the mixed run's blocks
        alone = run_core(core, [(seq(rid, prompt, adapter, max_new_tokens=max_new_tokens), 0)])[rid]
        reference = reference_generate(reference_model, prompt, adapter, max_new_tokens=max_new_tokens)
        assert mixed[rid] == alone == reference, (rid, len(prompt), adapter and adapter.name)
        if adapter is not None and adapter.positions(len(prompt)) != [[]] * len(adapter.positions(len(prompt))):
            steered += reference != reference_generate(reference_model, prompt, None, max_new_tokens=max_new_tokens)
    return core, steered


def test_llama_mixed_batch_of_ten_adapters_equals_alone_and_reference(tiny_model_dir):
    core, steered = check_mixed_batch(tiny_model_dir("llama"), count=40, max_batched_tokens=32, max_num_seqs=12)
    assert steered >= 20, "the adapters must actually change outputs, or the comparison proves nothing"


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_other_families_mixed_batch(tiny_model_dir, family):
    check_mixed_batch(tiny_model_dir(family), count=16, max_batched_tokens=48)


def test_mistral_sliding_window_mixed_batch(tmp_path):
    from server.models.tiny import build_tiny_model

    model_dir = build_tiny_model("mistral", tmp_path / "mistral", sliding_window=24)
    check_mixed_batch(model_dir, count=16, max_new_tokens=12, max_batched_tokens=40)


def test_preemption_under_a_tiny_kv_pool_keeps_outputs_identical(tiny_model_dir):
    # 40 blocks of 8 tokens: a handful of long requests cannot all fit, so the newest get preempted
    core, _ = check_mixed_batch(
        tiny_model_dir("llama"), count=16, max_new_tokens=10, num_blocks=48, max_batched_tokens=48, max_model_len=320
    )
    assert core.scheduler.num_preemptions > 0


def test_pyreft_fixture_adapters_in_one_mixed_batch(pyreft_fixture):
    from tests.conftest import FIXTURE
    from tests.test_pyreft_fixture import MAX_NEW_TOKENS, import_fixture_adapter

    _, _, expected = pyreft_fixture
    model = load_engine_model(FIXTURE / "model")
    adapters = {c["adapter"]: import_fixture_adapter(c["adapter"]) for c in expected["cases"]}
    core = make_core(model, max_batched_tokens=40, num_blocks=512)
    requests = []
    for i, case in enumerate(expected["cases"]):
        adapter = adapters[case["adapter"]]
        requests.append((seq(f"a{i}", case["prompt_ids"], adapter, max_new_tokens=MAX_NEW_TOKENS), i % 7))
        requests.append((seq(f"b{i}", case["prompt_ids"], None, max_new_tokens=MAX_NEW_TOKENS), i % 5))
    tokens = run_core(core, requests)
    for i, case in enumerate(expected["cases"]):
        assert tokens[f"a{i}"] == case["adapter_tokens"], case["adapter"]
        assert tokens[f"b{i}"] == case["base_tokens"]
