"""Sampling, stop conditions, logprobs, local failures, fairness and block accounting of the core."""

import math
import time

import pytest
import torch

from server.adapters.materialize import materialize
from server.adapters.random_adapters import random_adapter_file
from server.engine import sampler as sampler_module
from server.engine.sampler import Sampler, filter_logits
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import FinishReason, Sequence
from server.reft.interventions import Intervention
from tests.engine_utils import (
    assert_prefix_cache_finite,
    load_engine_model,
    make_core,
    poisoned,
    prompt,
    random_adapter,
    run_core,
    seq,
)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_engine_model(tiny_model_dir("llama"))


SAMPLED = [
    dict(temperature=0.9, presence_penalty=0.8, frequency_penalty=0.5, logit_bias=((70, 2.0), (71, -3.0)), seed=10),
    dict(temperature=0.8, seed=11),
    dict(temperature=1.3, top_k=20, seed=12),
    dict(temperature=1.0, top_p=0.8, seed=13),
    dict(temperature=0.9, min_p=0.1, seed=14),
    dict(temperature=1.0, repetition_penalty=1.3, seed=15),
    dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.1, seed=16),
]


def test_seeded_sampling_is_the_same_alone_and_in_a_mixed_batch(model):
    hidden = model.config.hidden_size
    adapters = [random_adapter(f"a{i}", "loreft", (i % 4,), 4, "f2+l2", hidden, seed=i) for i in range(3)]
    requests = []
    for i, params in enumerate(SAMPLED):
        adapter = adapters[i % 3] if i % 2 else None
        requests.append((seq(f"s{i}", prompt(10 + 17 * i, i), adapter, max_new_tokens=16, **params), i))
    for i in range(8):  # greedy neighbours that come and go
        requests.append((seq(f"g{i}", prompt(5 + 30 * i, 100 + i), adapters[i % 3], max_new_tokens=4 + i), 2 * i))
    core = make_core(model, max_batched_tokens=48)
    mixed = run_core(core, requests)
    for request, _ in requests:
        if request.request_id.startswith("s"):
            fresh = Sequence(request.request_id, request.prompt_ids, request.sampling, request.edit)
            core.kv.reset_prefix_cache()  # computed alone, not from the mixed run's blocks
            alone = run_core(core, [(fresh, 0)])
            assert mixed[request.request_id] == alone[request.request_id]
    distinct = {tuple(mixed[f"s{i}"]) for i in range(len(SAMPLED))}
    assert len(distinct) == len(SAMPLED)


def test_different_seeds_differ_and_unseeded_sampling_runs(model):
    core = make_core(model)
    p = prompt(20, 0)
    out = run_core(core, [(seq(f"x{s}", p, temperature=1.0, seed=s, max_new_tokens=12), 0) for s in range(4)])
    assert len({tuple(v) for v in out.values()}) == 4
    out = run_core(core, [(seq("u", p, temperature=1.0, max_new_tokens=12), 0)])
    assert len(out["u"]) == 12


def test_filters_keep_what_they_should():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = lambda **kw: torch.isfinite(  # noqa: E731
        filter_logits(logits, [kw.get("k", 0)], [kw.get("p", 1.0)], [kw.get("m", 0.0)])
    )[0].tolist()
    assert kept(k=2) == [True, True, False, False, False]
    assert kept(p=0.5) == [True, False, False, False, False]  # p(top) = 0.64 already crosses 0.5
    assert kept(p=0.9) == [True, True, True, False, False]
    assert kept(m=0.3) == [True, True, False, False, False]  # p(2nd)/p(top) = e^-1 = 0.37
    assert kept() == [True] * 5


def test_a_row_without_top_p_keeps_every_token_beside_one_with_it():
    """Rows share the sort when any row filters: one that asked for no top-p must keep its whole
    vocabulary, tail included, though float32's cumulative sum passes 1 there (found in review)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 50_000) * 3
    filtered = filter_logits(logits, [0, 0], [0.9, 1.0], [0.0, 0.0])
    assert torch.equal(filtered[1], logits[1])
    assert torch.isinf(filtered[0]).any()


def test_repetition_penalty_changes_greedy_choice():
    sampler = Sampler()
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    plain = Sequence("a", [0], SamplingParams())
    penalized = Sequence("b", [0], SamplingParams(repetition_penalty=1.2))
    assert sampler(logits, [plain]).samples()[0].token == 0
    assert sampler(logits, [penalized]).samples()[0].token == 1


def test_logit_bias_steers_greedy_decoding(model):
    core = make_core(model)
    forced = run_core(core, [(seq("b", prompt(12, 3), max_new_tokens=6, logit_bias=((65, 100.0),)), 0)])
    assert forced["b"] == [65] * 6
    # a frequency penalty large enough to beat the bias after two: it takes turns with the next best
    spread = run_core(
        core, [(seq("f", prompt(12, 3), max_new_tokens=6, logit_bias=((65, 10.0),), frequency_penalty=2.0), 0)]
    )
    assert spread["f"][:1] == [65] and spread["f"] != [65] * 6


def test_stop_token_eos_and_length(model, tiny_model_dir):
    from server.reft.reference import reference_generate
    from tests.conftest import load_reference_model

    reference_model = load_reference_model(tiny_model_dir("llama"))
    p = prompt(30, 5)
    expected = reference_generate(reference_model, p, None, max_new_tokens=12)
    stop_at = expected[5]
    core = make_core(model, eos={stop_at})
    out = run_core(core, [(seq("eos", p, max_new_tokens=12), 0)])
    assert out["eos"] == expected[: expected.index(stop_at) + 1]
    core = make_core(model)
    finished = {}
    core.add(seq("stop", p, max_new_tokens=12, stop_token_ids=(stop_at,)))
    core.add(seq("len", p, max_new_tokens=7))
    core.add(seq("ignore", p, max_new_tokens=12, ignore_eos=True))
    while core.has_work():
        for o in core.step():
            if o.finish_reason:
                finished[o.request_id] = (o.finish_reason, o.num_generated)
    assert finished["stop"] == (FinishReason.STOP, expected.index(stop_at) + 1)
    assert finished["len"] == (FinishReason.LENGTH, 7)
    assert finished["ignore"] == (FinishReason.LENGTH, 12)


def test_context_window_ends_generation(model):
    core = make_core(model, max_model_len=64)
    with pytest.raises(ValueError, match="context window"):
        core.add(seq("long", prompt(64, 0)))
    core.add(seq("edge", prompt(60, 0), max_new_tokens=100))
    reasons = [o.finish_reason for _ in range(20) for o in core.step()]
    assert FinishReason.LENGTH in reasons


def test_logprobs_match_the_model_distribution(model):
    from tests.conftest import load_reference_model

    core = make_core(model)
    p = prompt(12, 3)
    core.add(seq("lp", p, max_new_tokens=3, logprobs=5))
    samples = [s for _ in range(5) for o in core.step() for s in o.samples]
    assert len(samples) == 3
    tokens = p + [s.token for s in samples]
    reference = load_reference_model(model.name_or_path)  # the engine's model runs only inside the engine
    with torch.no_grad():
        logprobs = reference(torch.tensor([tokens])).logits[0].log_softmax(-1)
    for i, sample in enumerate(samples):
        row = logprobs[len(p) - 1 + i]
        assert sample.logprob == pytest.approx(row[sample.token].item(), abs=1e-4)
        assert [t for t, _ in sample.top_logprobs] == row.topk(5).indices.tolist()
        assert sample.top_logprobs[0][0] == sample.token and sample.rank == 1  # greedy picks the top token


def test_a_logprob_rank_counts_the_tokens_at_least_as_likely():
    """vLLM's rank: the tokens at least as likely, the token itself included, so a tie counts against it."""
    logprobs = torch.tensor([[-1.0, -2.0, -1.0, -3.0], [-0.5, -0.5, -2.0, -4.0]])
    host = sampler_module.logprob_table(torch.tensor([1, 0]), logprobs, 2)
    samples = sampler_module.read_logprob_table(host, [2, 0])
    assert [(s.token, s.logprob, s.rank) for s in samples] == [(1, -2.0, 3), (0, -0.5, 2)]
    assert samples[0].top_logprobs == [(0, -1.0), (2, -1.0)] and samples[1].top_logprobs == []


def test_a_failing_adapter_fails_only_its_own_request(model, tiny_model_dir):
    from server.reft.reference import reference_generate
    from tests.conftest import load_reference_model

    hidden = model.config.hidden_size
    good = random_adapter("good", "loreft", (1,), 4, "f2+l2", hidden, seed=1)
    broken = random_adapter("broken", "loreft", (1,), 4, "f2+l2", hidden, seed=2)
    bad_params = dict(broken.layers[1][0].params, rotation=torch.zeros(hidden + 1, 4))  # wrong shape at run time
    broken.layers[1][0] = Intervention(broken.layers[1][0].kind, broken.layers[1][0].act, bad_params)
    core = make_core(model)
    p1, p2, p3 = prompt(20, 1), prompt(33, 2), prompt(7, 3)
    requests = [(seq("good", p1, good), 0), (seq("broken", p2, broken), 0), (seq("base", p3), 0)]
    finished = {}
    tokens = {}
    for request, _ in requests:
        core.add(request)
    while core.has_work():
        for o in core.step():
            tokens.setdefault(o.request_id, []).extend(o.new_tokens)
            if o.finish_reason:
                finished[o.request_id] = (o.finish_reason, o.error)
    assert finished["broken"][0] is FinishReason.ERROR and "adapter" in finished["broken"][1]
    reference_model = load_reference_model(tiny_model_dir("llama"))
    assert tokens["good"] == reference_generate(reference_model, p1, good, max_new_tokens=10)
    assert tokens["base"] == reference_generate(reference_model, p3, None, max_new_tokens=10)
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_a_long_request_is_not_starved_by_a_stream_of_short_ones(model):
    core = make_core(model, max_batched_tokens=16, max_num_seqs=4, num_blocks=80)
    requests = [(seq("long", prompt(300, 0), max_new_tokens=4), 0)]
    requests += [(seq(f"short{i}", prompt(8, i), max_new_tokens=3), i) for i in range(1, 200)]
    finished_order = []
    pending = sorted(requests, key=lambda r: r[1])
    step = 0
    while pending or core.has_work():
        while pending and pending[0][1] <= step:
            core.add(pending.pop(0)[0])
        finished_order += [o.request_id for o in core.step() if o.finish_reason]
        step += 1
    assert finished_order.index("long") < 60, "the long request waited behind later arrivals"


def test_admission_is_first_come_first_served(model):
    core = make_core(model, max_num_seqs=2, max_batched_tokens=64)
    for i in range(6):
        core.add(seq(f"r{i}", prompt(10, i), max_new_tokens=5))
    order = []
    while core.has_work():
        order += [o.request_id for o in core.step() if o.finish_reason]
    assert order == [f"r{i}" for i in range(6)]


def test_a_prompt_as_long_as_the_window_is_admitted_into_an_idle_pool_whatever_the_watermark(model):
    """The watermark keeps blocks free for running decodes; with none running it must not keep a prompt
    the context window allows out for ever, nor everyone queued behind it (found by fuzzing)."""
    core = make_core(model, num_blocks=13, block_size=4, max_model_len=48, max_batched_tokens=64, watermark_blocks=2)
    requests = [(seq("long", prompt(47, 0), max_new_tokens=1), 0), (seq("short", prompt(3, 1)), 0)]
    served = run_core(core, requests, max_steps=200)
    assert len(served["long"]) == 1 and served["short"]


def test_adapter_with_no_positions_on_a_one_token_prompt_equals_base(model):
    adapter = random_adapter("x", "loreft", (0, 1), 4, "f3+l3", model.config.hidden_size)
    assert adapter.positions(1) == [[]]
    core = make_core(model)
    out = run_core(core, [(seq("a", [1], adapter), 0), (seq("b", [1]), 0)])
    assert out["a"] == out["b"]


def test_adapter_dtype_follows_the_model(model):
    adapter_file = random_adapter_file("loreft", (0,), 4, "f1", model.config.hidden_size)
    adapter = materialize(adapter_file, name="bf", dtype=torch.bfloat16)
    params = adapter.layers[0][0].params
    assert params["rotation"].dtype == torch.float32 and params["weight"].dtype == torch.bfloat16


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model):
    core = make_core(model)
    real_sampler = core.sampler
    core.sampler = lambda *args: (_ for _ in ()).throw(RuntimeError("boom"))
    core.add(seq("a", prompt(12, 1)))
    core.add(seq("b", prompt(30, 2)))
    outputs = core.step()
    assert {(o.request_id, o.finish_reason) for o in outputs} == {("a", FinishReason.ERROR), ("b", FinishReason.ERROR)}
    assert all("boom" in o.error for o in outputs)
    assert core.kv.num_free_blocks == core.kv.num_blocks and not core.has_work()
    core.sampler = real_sampler
    assert len(run_core(core, [(seq("c", prompt(12, 1)), 0)])["c"]) == 10


@pytest.mark.parametrize(
    "attention_backend, async_scheduling", [("sdpa", False), ("sdpa", True), ("paged", True), ("flex", False)]
)
def test_a_poisoned_adapter_fails_alone_and_leaves_no_trace_in_the_kv_cache(
    model, tiny_model_dir, attention_backend, async_scheduling
):
    """An adapter whose finite weights blow the hidden states up (all 3e38) fails only its request, with
    no token emitted; the requests beside it, and those that later get its freed blocks (or would find
    them in the prefix cache), are unchanged. Flex, which weighs other sequences' slots 0, included."""
    from server.reft.reference import reference_generate
    from tests.conftest import load_reference_model

    hidden = model.config.hidden_size
    good = random_adapter("good", "loreft", (1,), 4, "f2+l2", hidden, seed=1)
    bad = poisoned(random_adapter("poisoned", "loreft", (1, 2), 4, "f2+l2", hidden, seed=2))
    config = {"attention_backend": attention_backend, "async_scheduling": async_scheduling}
    core = make_core(model, num_blocks=12, block_size=8, max_model_len=80, **config)  # few: later ones reuse them
    reference_model = load_reference_model(tiny_model_dir("llama"))
    prompts = {f"p{i}": prompt(5 + 9 * i, 50 + i) for i in range(8)}
    first = [seq("poisoned", prompts["p3"], bad), seq("good", prompts["p1"], good), seq("base", prompts["p2"])]
    finished = {}
    tokens = run_core(core, [(s, 0) for s in first], finished=finished)
    assert finished["poisoned"][0] is FinishReason.ERROR and "non-finite" in finished["poisoned"][1]
    assert tokens.get("poisoned", []) == []
    assert assert_prefix_cache_finite(core.kv)
    assert tokens["good"] == reference_generate(reference_model, prompts["p1"], good, max_new_tokens=10)
    assert tokens["base"] == reference_generate(reference_model, prompts["p2"], None, max_new_tokens=10)
    later = run_core(core, [(seq(f"later{i}", prompts[f"p{i}"]), i % 3) for i in range(8)])
    for i in range(8):
        assert later[f"later{i}"] == reference_generate(reference_model, prompts[f"p{i}"], None, max_new_tokens=10)
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_attention_never_reads_what_a_block_held_before(model, tiny_model_dir):
    """Every slot a request may be handed holds NaN left by earlier owners: outputs are unchanged."""
    from server.reft.reference import reference_generate
    from tests.conftest import load_reference_model

    core = make_core(model, num_blocks=40, block_size=8, max_model_len=200)
    usable = core.kv.num_blocks * core.kv.block_size  # the pad block stays as it is
    core.kv.keys[:, :usable] = float("nan")
    core.kv.values[:, :usable] = float("nan")
    prompts = [prompt(3 + 11 * i, 70 + i) for i in range(6)]
    tokens = run_core(core, [(seq(f"r{i}", p), i % 2) for i, p in enumerate(prompts)])
    reference_model = load_reference_model(tiny_model_dir("llama"))
    for i, p in enumerate(prompts):
        assert tokens[f"r{i}"] == reference_generate(reference_model, p, None, max_new_tokens=10)


def test_a_sampling_fault_fails_only_its_own_row(model, tiny_model_dir):
    from server.reft.reference import reference_generate
    from tests.conftest import load_reference_model

    core = make_core(model)
    real_sampler = core.sampler

    def sampler_that_chokes_on_one_request(logits, seqs, pending=None):  # stands in for any per-row fault
        if any(s.request_id == "bad" for s in seqs):
            raise RuntimeError("boom")
        return real_sampler(logits, seqs, pending)

    core.sampler = sampler_that_chokes_on_one_request
    prompts = [prompt(11, 1), prompt(17, 2), prompt(23, 3)]
    finished = {}
    tokens = run_core(
        core, [(seq("ok1", prompts[0]), 0), (seq("bad", prompts[1]), 0), (seq("ok2", prompts[2]), 0)], finished=finished
    )
    assert finished["bad"][0] is FinishReason.ERROR and "boom" in finished["bad"][1]
    reference_model = load_reference_model(tiny_model_dir("llama"))
    assert tokens["ok1"] == reference_generate(reference_model, prompts[0], None, max_new_tokens=10)
    assert tokens["ok2"] == reference_generate(reference_model, prompts[2], None, max_new_tokens=10)


def test_a_seeded_request_draws_the_same_tokens_when_a_batched_draw_is_retried(model, monkeypatch):
    """A batched draw that fails after drawing its noise (out of memory building the logprobs table, say)
    is drawn again row by row: the seeded rows must draw what they would have (found by fuzzing)."""
    params = {"temperature": 1.0, "seed": 1234, "logprobs": 1, "max_new_tokens": 8}
    alone = run_core(make_core(model), [(seq("s", prompt(10, 1), **params), 0)])["s"]
    table, faults = sampler_module.logprob_table, []

    def fails_once_for_a_batch(tokens, raw_logprobs, top):
        if tokens.shape[0] > 1 and not faults:
            faults.append(1)
            raise RuntimeError("CUDA out of memory (simulated)")
        return table(tokens, raw_logprobs, top)

    monkeypatch.setattr(sampler_module, "logprob_table", fails_once_for_a_batch)
    mixed = run_core(
        make_core(model), [(seq("s", prompt(10, 1), **params), 0), (seq("g", prompt(7, 2), logprobs=0), 0)]
    )
    assert faults and mixed["s"] == alone


def test_a_one_token_prompt_chunk_counts_as_prefill(model):
    """A step's prefill tokens (the metrics' step kind) are the prompt tokens it computes, a chunk of one
    included: the first step of a one-token prompt prefills, the next ones decode."""
    core = make_core(model)
    core.add(seq("one", [1], max_new_tokens=3))
    kinds = []
    while core.has_work():
        core.step()
        kinds.append(core.last_step.num_prefill_tokens if core.last_step else None)
    assert kinds[:3] == [1, 0, 0]


def test_a_steps_phases_split_its_time(model):
    """Scheduling, launching and reading (StepStats.phase_seconds, the metrics' reft_step_phase_seconds) add up
    to the step's time."""
    core = make_core(model)
    core.add(seq("a", [5, 6, 7, 8], max_new_tokens=4))
    while core.has_work():
        core.step()
        step = core.last_step
        if step is not None:
            phases = step.phase_seconds
            assert set(phases) == {"schedule", "launch", "read"} and min(phases.values()) >= 0
            assert phases["launch"] > 0 and math.isclose(sum(phases.values()), step.seconds)
            assert 0 < step.cpu_seconds <= step.seconds


def test_a_step_that_waits_shows_less_cpu_time_than_wall_time(model):
    """StepStats.cpu_seconds is the stepping thread's own CPU time: a step that spends part of its wall time
    waiting (for the GIL held by another thread, for a device) leaves that part out. The wait here is a sleep in
    every forward, which uses no CPU, so the split is deterministic (a thread holding the GIL was not: the
    scheduler sometimes ran it only between steps)."""
    core = make_core(model)
    core.add(seq("a", [5, 6, 7, 8], max_new_tokens=4))
    waiting = model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    wall = cpu = 0.0
    try:
        while core.has_work():
            core.step()
            if core.last_step is not None:
                wall, cpu = wall + core.last_step.seconds, cpu + core.last_step.cpu_seconds
    finally:
        waiting.remove()
    assert wall >= 0.02 * 4 and 0 < cpu < 0.75 * wall
