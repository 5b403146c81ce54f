"""Async scheduling: each step's sampled tokens are read in the next step, after its launch, and a
decoding sequence's next input token comes from the device. Whatever else changes, every request's
tokens, logprobs and finish reason must equal the synchronous engine's, over both the sdpa path and
the padded decode-graph path (run uncaptured on the CPU), with EOS and stop tokens, length and context
limits, seeds, logprobs, repetition penalties, preemption, aborts and a faulty sampler. The check that
adapter edits left the hidden states finite is read with the step's tokens: a poisoned request fails with
no token, and no block it wrote reaches the prefix cache."""

import random
import sys

import pytest

from server.engine.core import InFlight
from server.engine.model_runner import EditCheck
from server.engine.sequence import FinishReason
from server.engine.transfers import HostCopy
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
from tests.test_engine_correctness import check_mixed_batch, make_adapters

PATHS = {"sdpa": {"attention_backend": "sdpa"}, "graphs": {"attention_backend": "paged", "cuda_graphs": True}}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_engine_model(tiny_model_dir("llama"))


def requests(model, count=28, seed=0):
    """Mixed adapters and sampling: greedy, seeded, logprobs, penalties, stop tokens, staggered arrivals."""
    rng = random.Random(seed)
    adapters = make_adapters(model.config.hidden_size, model.config.num_hidden_layers)
    made = []
    for i in range(count):
        sampling = {"max_new_tokens": rng.randint(1, 20)}
        kind = i % 5
        if kind == 1:
            sampling |= {"temperature": 0.9, "top_k": 40, "seed": i}
        elif kind == 2:
            sampling |= {"logprobs": 3}
        elif kind == 3 and i % 2:  # penalties that count the previous step's token, pending under async scheduling
            sampling |= {"repetition_penalty": 1.3}
        elif kind == 3:  # a biased token that wins until the penalties for its first use outweigh the bias
            bias = ((rng.randrange(3, 259), 3.0),)
            sampling |= {"frequency_penalty": 2.0, "presence_penalty": 2.0, "logit_bias": bias}
        elif kind == 4:
            sampling |= {"stop_token_ids": (rng.randrange(3, 259),), "temperature": 1.0, "seed": i}
        adapter = (adapters + [None])[i % (len(adapters) + 1)]
        made.append((f"r{i}", prompt(rng.randint(1, 120), 100 + i), adapter, sampling, rng.randint(0, 25)))
    return made


def serve(model, made, async_scheduling, eos=frozenset(), prepare=None, **config):
    """Every request's (tokens, logprobs, finish reason), and the share of launches that took a pending
    token; `prepare(core)` runs first."""
    core = make_core(model, eos=eos, async_scheduling=async_scheduling, **config)
    if prepare is not None:
        prepare(core)
    took_pending = []
    run = core.runner.run

    def recording_run(chunks, pending=None):
        took_pending.append(pending is not None)
        return run(chunks, pending)

    core.runner.run = recording_run
    results = {}
    step, waiting = 0, sorted(made, key=lambda r: r[4])
    while waiting or core.has_work():
        while waiting and waiting[0][4] <= step:
            rid, p, adapter, sampling, _ = waiting.pop(0)
            core.add(seq(rid, p, adapter, **sampling))
        for out in core.step():
            tokens, logprobs, _ = results.get(out.request_id, ([], [], None))
            logprobs = logprobs + [(s.logprob, s.top_logprobs) for s in out.samples]
            results[out.request_id] = (tokens + out.new_tokens, logprobs, out.finish_reason)
        step += 1
        assert step < 10_000
    assert core.kv.num_free_blocks == core.kv.num_blocks and not core.sequences
    return results, sum(took_pending) / len(took_pending)


def assert_same(observed, expected):
    """Tokens, finish reasons and top-logprob ids exactly; logprob values to float32 rounding (a step of
    the async engine can hold other rows, such as a finished request's last, which moves the last bits)."""
    assert observed.keys() == expected.keys()
    for rid, (tokens, logprobs, reason) in expected.items():
        assert (observed[rid][0], observed[rid][2]) == (tokens, reason), rid
        for (value, top), (seen_value, seen_top) in zip(logprobs, observed[rid][1], strict=True):
            assert (seen_value is None) == (value is None) and (seen_top is None) == (top is None), rid
            if value is not None:
                assert seen_value == pytest.approx(value, abs=1e-4), rid
                assert [i for i, _ in seen_top] == [i for i, _ in top], rid
                assert [v for _, v in seen_top] == pytest.approx([v for _, v in top], abs=1e-4), rid


def common_eos(model, made, **config):
    """The token that the most requests of the synchronous run generate: as EOS it ends many early."""
    results, _ = serve(model, made, False, **config)
    counts = {}
    for tokens, _, _ in results.values():
        for token in set(tokens):
            counts[token] = counts.get(token, 0) + 1
    return max(counts, key=counts.get)


@pytest.mark.parametrize("path", PATHS)
def test_async_equals_sync_token_for_token(model, path):
    made = requests(model)
    config = {**PATHS[path], "max_batched_tokens": 48, "max_num_seqs": 10, "max_model_len": 128}
    eos = {common_eos(model, made, **config)}
    expected, none_pending = serve(model, made, False, eos=eos, **config)
    observed, took_pending = serve(model, made, True, eos=eos, **config)
    assert none_pending == 0
    assert took_pending > 0.5, "decode inputs must come from the device, or the overlap never happened"
    assert_same(observed, expected)
    reasons = [reason for _, _, reason in expected.values()]
    assert reasons.count(FinishReason.STOP) >= 5 and reasons.count(FinishReason.LENGTH) >= 5


def test_mixed_batch_equals_alone_and_reference_under_preemption(tiny_model_dir):
    core, steered = check_mixed_batch(
        tiny_model_dir("llama"),
        count=16,
        max_new_tokens=10,
        num_blocks=48,
        max_batched_tokens=48,
        max_model_len=320,
        attention_backend="paged",
        async_scheduling=True,
    )
    assert core.scheduler.num_preemptions > 0 and steered > 0


def test_a_length_limit_costs_no_extra_launch(model):
    core = make_core(model, async_scheduling=True)
    launches = []
    run = core.runner.run
    core.runner.run = lambda chunks, pending=None: launches.append(len(chunks)) or run(chunks, pending)
    tokens = run_core(core, [(seq("x", prompt(9, 1), max_new_tokens=5), 0)])
    assert len(tokens["x"]) == 5
    assert launches == [1] * 5  # the prefill and four decodes: none for a token past the limit


def test_abort_while_a_step_is_in_flight_drops_its_token_and_changes_no_one_else(model):
    p, q = prompt(20, 1), prompt(33, 2)
    alone = run_core(make_core(model), [(seq("q", q, max_new_tokens=12), 0)])["q"]
    core = make_core(model, async_scheduling=True)
    core.add(seq("p", p, max_new_tokens=12))
    core.add(seq("q", q, max_new_tokens=12))
    produced = {"p": [], "q": []}
    for _ in range(4):
        for out in core.step():
            produced[out.request_id] += out.new_tokens
    assert core.sequences["p"].num_pending == 1
    aborted = core.abort("p")
    assert aborted.finish_reason is FinishReason.ABORT
    while core.has_work():
        for out in core.step():
            assert out.request_id == "q"
            produced["q"] += out.new_tokens
    assert produced["q"] == alone and len(produced["p"]) == 3
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_a_sampling_fault_fails_only_its_own_row(model):
    made = requests(model, count=10)

    def choke_on_r3(core):
        sampler = core.sampler

        def choking(logits, seqs, pending=None):  # stands in for any per-row fault in a batched op
            if any(s.request_id == "r3" for s in seqs):
                raise RuntimeError("boom")
            return sampler(logits, seqs, pending)

        core.sampler = choking

    expected, _ = serve(model, made, False)
    observed, _ = serve(model, made, True, prepare=choke_on_r3)
    assert observed.pop("r3")[2] is FinishReason.ERROR
    assert_same(observed, {rid: result for rid, result in expected.items() if rid != "r3"})


def test_the_async_front_end_streams_the_same_tokens(model):
    from server.engine.async_engine import GenerationRequest
    from server.engine.sampling_params import SamplingParams
    from tests.test_async_engine import run, with_engine

    prompts = [prompt(5 + 9 * i, i) for i in range(8)]
    expected = run_core(make_core(model), [(seq(f"r{i}", p, max_new_tokens=3 + i), 0) for i, p in enumerate(prompts)])

    async def body(engine):
        streams = [
            engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=3 + i))) for i, p in enumerate(prompts)
        ]
        return [await stream.collect() for stream in streams]

    results = run(with_engine(model, body, async_scheduling=True))
    assert [result.token_ids for result in results] == [expected[f"r{i}"] for i in range(8)]
    assert all(result.finish_reason is FinishReason.LENGTH for result in results)


def run_with_fault(model, async_scheduling, fault, read_landed_first=False):
    """r1 stops on EOS after a few tokens, r2 runs on; `fault(core, eos)` plants one failure. Returns each
    request's (tokens, finish reason), driving the core as CoreLoop does (an escaping error is logged).
    `read_landed_first`: every step is read before the next is scheduled (the CPU's steps have all landed)."""
    p1, p2 = prompt(12, 1), prompt(15, 2)
    eos = run_core(make_core(model), [(seq("r1", p1, max_new_tokens=10), 0)])["r1"][3]
    core = make_core(model, eos={eos}, async_scheduling=async_scheduling)
    core.read_landed_first = read_landed_first
    core.add(seq("r1", p1, max_new_tokens=10))
    core.add(seq("r2", p2, max_new_tokens=12, ignore_eos=True))
    fault(core, eos)
    results = {}
    for _ in range(100):
        if not core.has_work():
            break
        try:
            outputs = core.step()
        except RuntimeError:
            continue
        for out in outputs:
            tokens, _ = results.get(out.request_id, ([], None))
            results[out.request_id] = (tokens + out.new_tokens, out.finish_reason)
    assert not core.has_work() and core.kv.num_free_blocks == core.kv.num_blocks
    return results


def fail_nth_call(owner, name, n):
    real, calls = getattr(owner, name), []

    def failing(*args):
        calls.append(None)
        if len(calls) == n:
            raise RuntimeError("planted fault")
        return real(*args)

    setattr(owner, name, failing)


def fail_launch_after_eos(core, eos):  # the launch after the one that drew r1's EOS (its 4th token)
    fail_nth_call(core.runner, "run", 5)


def fail_r1_draw_after_eos(core, eos):  # batched and alone: r1's row fails, the others' do not
    real, draws = core.sampler, []

    def sampler(logits, seqs, pending=None):
        if any(s.request_id == "r1" for s in seqs):
            draws.append(None)
            if len(draws) > 4:
                raise RuntimeError("planted fault")
        return real(logits, seqs, pending)

    core.sampler = sampler


def fail_one_schedule(core, eos):  # a bug that escapes step() while a draw is in flight
    fail_nth_call(core.scheduler, "schedule", 4)


@pytest.mark.parametrize("fault", [fail_launch_after_eos, fail_r1_draw_after_eos, fail_one_schedule])
def test_a_fault_after_a_stop_changes_nothing_already_drawn(model, fault):
    expected = run_with_fault(model, False, fault)
    assert expected["r1"][1] is FinishReason.STOP and len(expected["r1"][0]) == 4
    assert run_with_fault(model, True, fault) == expected
    assert run_with_fault(model, True, fault, read_landed_first=True) == expected  # what a step read, it returns


def fail_two_schedules_in_a_row(core, eos):  # a bug that repeats once: the core loop survives three
    fail_nth_call(core.scheduler, "schedule", 4)  # the inner one's 4th call is the outer one's 5th
    fail_nth_call(core.scheduler, "schedule", 4)


def test_outputs_of_a_step_that_raised_survive_the_next_raising_too(model):
    expected = run_with_fault(model, False, fail_two_schedules_in_a_row)
    assert run_with_fault(model, True, fail_two_schedules_in_a_row) == expected
    assert run_with_fault(model, True, fail_two_schedules_in_a_row, read_landed_first=True) == expected


def test_a_finish_read_by_a_step_that_raised_reaches_the_client_with_nothing_else_running(model):
    """The last request's last token is read first, then scheduling raises: the loop, which steps only
    while the core has work, must still step once more to deliver the finish."""
    core = make_core(model, async_scheduling=True)
    core.read_landed_first = True
    core.add(seq("only", prompt(10, 1), max_new_tokens=3))
    while core._in_flight is None or not core.sequences["only"].ending:
        core.step()
    fail_nth_call(core.scheduler, "schedule", 1)
    with pytest.raises(RuntimeError):
        core.step()
    assert "only" not in core.sequences and core.has_work()
    outputs = core.step()
    assert [o.finish_reason for o in outputs] == [FinishReason.LENGTH] and not core.has_work()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("path", PATHS)
def test_reading_landed_steps_first_keeps_async_equal_to_sync(model, monkeypatch, path, seed):
    """Where the device has finished a step by the time the next begins (a host-bound engine on a GPU),
    the core reads it before scheduling, else after the next launch as usual. With steps landing at
    random, every request's tokens, logprobs and finish reason stay the synchronous engine's."""
    rng = random.Random(seed)
    landed_answers = []

    def landed_at_random(in_flight):
        landed_answers.append(rng.random() < 0.5)
        return landed_answers[-1]

    made = requests(model, seed=seed)
    config = {**PATHS[path], "max_batched_tokens": 48, "max_num_seqs": 10, "max_model_len": 128}
    eos = {common_eos(model, made, **config)}
    expected, _ = serve(model, made, False, eos=eos, **config)
    monkeypatch.setattr(InFlight, "landed", landed_at_random)
    observed, took_pending = serve(model, made, True, eos=eos, prepare=read_landed_first, **config)
    assert True in landed_answers and False in landed_answers and 0 < took_pending < 1
    assert_same(observed, expected)


def read_landed_first(core):
    core.read_landed_first = True


@pytest.mark.parametrize("seed", range(12))
def test_random_pools_limits_and_shared_prefixes_keep_async_equal_to_sync(model, seed):
    """Small random pools (preemption), block sizes, budgets and context windows, prompts that share
    prefixes (prefix caching), random EOS ids and every sampling kind."""
    rng = random.Random(seed)
    block_size, max_model_len = rng.choice([2, 4, 8]), rng.choice([40, 64])
    max_num_seqs = rng.choice([4, 8, 16])
    config = {
        "block_size": block_size,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "max_batched_tokens": max(max_num_seqs, rng.choice([16, 24, 48])),
        "num_blocks": max(rng.choice([12, 16, 24, 64]), max_model_len // block_size + 3),
        **rng.choice(list(PATHS.values())),
    }
    stems = [prompt(rng.randint(4, 30), 1000 + seed * 10 + k) for k in range(3)]
    made = []
    for i in range(rng.randint(4, 14)):
        sampling = {"max_new_tokens": rng.randint(1, 25)}
        sampling |= rng.choice(
            [{}, {"temperature": 0.8, "seed": i}, {"logprobs": 2}, {"repetition_penalty": 1.5, "seed": i}]
        )
        own = prompt(rng.randint(1, 20), 2000 + seed * 100 + i)
        p = rng.choice(stems) + own[1:] if rng.random() < 0.5 else own
        made.append((f"r{i}", p[: max_model_len - 1], None, sampling, rng.randint(0, 20)))
    eos = {rng.randrange(3, 259) for _ in range(3)}
    expected, _ = serve(model, made, False, eos=eos, **config)
    observed, _ = serve(model, made, True, eos=eos, **config)
    assert_same(observed, expected)


def test_a_poisoned_prompt_chunked_over_steps_fails_and_indexes_nothing(model):
    """A prompt whose adapter blows the hidden states up, prefilled over several steps (several checks in
    flight at once): it fails with no token, and none of its blocks reach the prefix cache, while the
    same prompt under a sound adapter is served, indexed, and reused by a later request."""
    sound = random_adapter("sound", "loreft", (1,), 4, "f2+l2", model.config.hidden_size, seed=1)
    p = prompt(100, 7)
    expected = run_core(make_core(model), [(seq("s", p, sound), 0)])["s"]
    core = make_core(model, max_batched_tokens=32, async_scheduling=True)
    finished = {}
    hidden = model.config.hidden_size
    bad = seq("bad", p, poisoned(random_adapter("poisoned", "loreft", (1,), 4, "f2+l2", hidden, seed=2)))
    tokens = run_core(core, [(bad, 0), (seq("s", p, sound), 0)], finished=finished)
    assert finished["bad"][0] is FinishReason.ERROR and "non-finite" in finished["bad"][1]
    assert tokens.get("bad", []) == [] and tokens["s"] == expected and bad.unchecked_edits == 0
    assert assert_prefix_cache_finite(core.kv)
    hits = core.kv.prefix_hits
    assert run_core(core, [(seq("again", p, sound), 0)])["again"] == expected
    assert core.kv.prefix_hits >= hits + 96  # the sound prompt's twelve full blocks, from the cache


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_an_edited_prompt_enters_the_prefix_cache_once_checked(model, async_scheduling):
    """Held back while its check is unread, an edited prompt's blocks are indexed once it passes, even
    when the request ends at once (one token) and no later step would index them."""
    sound = random_adapter("sound", "loreft", (1,), 4, "f2+l2", model.config.hidden_size, seed=1)
    p = prompt(41, 3)
    core = make_core(model, async_scheduling=async_scheduling)
    first = seq("first", p, sound, max_new_tokens=1)
    run_core(core, [(first, 0)])
    assert first.unchecked_edits == 0
    hits = core.kv.prefix_hits
    run_core(core, [(seq("second", p, sound, max_new_tokens=1), 0)])
    assert core.kv.prefix_hits == hits + 40  # five full blocks of eight


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_an_edit_check_that_cannot_be_read_fails_its_requests(model, monkeypatch, async_scheduling):
    def unreadable(self):
        raise RuntimeError("flags lost")

    monkeypatch.setattr(EditCheck, "failures", unreadable)
    sound = random_adapter("sound", "loreft", (1,), 4, "f2+l2", model.config.hidden_size, seed=1)
    core = make_core(model, async_scheduling=async_scheduling)
    finished = {}
    requests = [(seq("edited", prompt(20, 1), sound), 0), (seq("base", prompt(20, 2)), 0)]
    tokens = run_core(core, requests, finished=finished)
    assert finished["edited"][0] is FinishReason.ERROR and "flags lost" in finished["edited"][1]
    assert tokens.get("edited", []) == [] and len(tokens["base"]) == 10
    assert not core.kv._key_of_block or assert_prefix_cache_finite(core.kv)


def test_a_read_that_raises_fails_its_steps_requests_and_keeps_the_launched_edit_check(model):
    """The read of the step before raises once (a bug) after a poisoned prompt's first chunk was launched:
    the read step's request fails at once (it would wait forever on its token), and the launched check is
    read next time, so the poisoned request fails too. Its adapter edits the first positions only, so no
    later chunk would be checked again."""
    core = make_core(model, max_batched_tokens=16, async_scheduling=True)
    core.add(seq("warm", prompt(10, 5), max_new_tokens=1))
    core.step()
    edits_first = poisoned(random_adapter("poisoned", "loreft", (1,), 4, "f2", model.config.hidden_size, seed=2))
    bad = seq("bad", prompt(40, 9), edits_first, max_new_tokens=4)
    core.add(bad)
    fail_nth_call(core, "_read", 1)
    outputs = core.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("warm", FinishReason.ERROR)]
    assert "reading the step failed" in outputs[0].error
    outputs = []
    while core.has_work():
        outputs += core.step()
    assert [(o.request_id, o.new_tokens, o.finish_reason) for o in outputs] == [("bad", [], FinishReason.ERROR)]
    assert "non-finite" in outputs[0].error and bad.unchecked_edits == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_each_step_reports_how_long_it_blocked_for_the_device(model, monkeypatch, async_scheduling):
    """What a step spent blocked for the device (its own results, or with async scheduling the step
    before's) is in its stats, so the metrics can tell a device-bound engine from a host-bound one."""
    wait = HostCopy.wait

    def slow_device(copy):
        copy.waited += 0.01  # as a device still computing would make it wait
        return wait(copy)

    monkeypatch.setattr(HostCopy, "wait", slow_device)
    core = make_core(model, async_scheduling=async_scheduling)
    core.add(seq("a", prompt(10, 1), max_new_tokens=5))
    waits = []
    while core.has_work():
        core.step()
        if core.last_step is not None:
            waits.append(core.last_step.device_wait_seconds)
    expected = [0.0, 0.01, 0.01, 0.01, 0.01] if async_scheduling else [0.01] * 5  # async: the first reads nothing
    assert waits == pytest.approx(expected)


# Found by a fault-injection fuzzer: a read that raises (a bug; `kv.cache_full_blocks` in `_settle` is a
# real trigger) must end the read step's requests rather than leave them waiting on a token, keep the
# step's other outputs and edit checks, and an abort must carry the tokens a raising step held for it.


def state(core):
    return {
        rid: (s.status.name, f"num_pending={s.num_pending}", f"ending={s.ending}") for rid, s in core.sequences.items()
    }


def step_as_core_loop_does(core):
    """One step, a raising one caught and logged as CoreLoop does."""
    try:
        return core.step()
    except RuntimeError:
        return []


def drain(core, limit=50):
    outputs = []
    for _ in range(limit):
        if not core.has_work():
            break
        outputs += core.step()
    return outputs


def test_no_output_after_an_abort_of_a_request_whose_token_a_raising_step_held(model):
    core = make_core(model, async_scheduling=True)
    core.read_landed_first = True  # as on CUDA
    core.add(seq("a", prompt(10, 1), max_new_tokens=5))
    core.step()  # launches a's prefill
    fail_nth_call(core.scheduler, "schedule", 1)
    with pytest.raises(RuntimeError):
        core.step()  # reads a's 1st token first (kept in core._unreturned), then scheduling raises
    aborted = core.abort("a")  # CoreLoop applies the command before its next step
    assert aborted.finish_reason is FinishReason.ABORT
    later = [(o.new_tokens, o.finish_reason) for o in drain(core) if o.request_id == "a"]
    assert later == [], f"outputs after a's ABORT finish: {later}"


def test_a_read_that_raises_after_the_launch_still_ends_the_request(model):
    core = make_core(model, async_scheduling=True)
    core.add(seq("a", prompt(10, 1), max_new_tokens=2))
    core.step()  # prefill: a's 1st token in flight
    fail_nth_call(core, "_read", 1)
    outputs = step_as_core_loop_does(core)  # launches a's 2nd token, then reading the 1st raises
    outputs += drain(core)
    a = [(o.new_tokens, o.finish_reason) for o in outputs if o.request_id == "a"]
    assert not core.has_work(), f"a never ends (num_pending stuck, ending): delivered {a}, state {state(core)}"


def test_a_read_first_that_raises_still_ends_the_request_cleanly(model):
    core = make_core(model, async_scheduling=True)
    core.read_landed_first = True
    core.add(seq("a", prompt(10, 1), max_new_tokens=3))
    core.step()
    fail_nth_call(core, "_read", 1)
    outputs = step_as_core_loop_does(core)  # reading a's 1st token first raises
    outputs = [(o.new_tokens, o.finish_reason, o.error) for o in outputs + drain(core) if o.request_id == "a"]
    assert not core.has_work() and outputs[-1][1] is not None, outputs
    assert "row_of" not in (outputs[-1][2] or ""), (
        f"a fails later, of the lost token, with an unrelated error: {outputs}"
    )


def test_sync_a_read_that_raises_keeps_the_steps_other_outputs(model):
    core = make_core(model)
    core.add(seq("a", prompt(10, 1), max_new_tokens=3))
    core.add(seq("b", prompt(12, 2), max_new_tokens=3))
    real = core.sampler

    def sampler(logits, seqs, pending=None):  # b's row fails: b ends with ERROR in this step
        if any(s.request_id == "b" for s in seqs):
            raise RuntimeError("planted fault")
        return real(logits, seqs, pending)

    core.sampler = sampler
    fail_nth_call(core, "_read", 1)
    outputs = step_as_core_loop_does(core)
    assert "b" not in core.sequences  # b was finished ...
    finishes = {o.request_id: (o.finish_reason, o.error) for o in outputs + drain(core) if o.finish_reason}
    assert "b" in finishes, f"... but its finish never comes out; finishes: {finishes}"


def test_sync_a_read_that_raises_keeps_the_edit_check(model):
    hidden = model.config.hidden_size
    edits_first = poisoned(random_adapter("poisoned", "loreft", (1,), 4, "f2", hidden, seed=2))
    core = make_core(model, max_batched_tokens=16)
    core.add(seq("bad", prompt(40, 9), edits_first, max_new_tokens=4))
    fail_nth_call(core, "_read", 1)  # the read of the first chunk (no token, its edit check)
    outputs = [(o.new_tokens, o.finish_reason, o.error) for o in step_as_core_loop_does(core) + drain(core)]
    assert outputs[-1][1] is FinishReason.ERROR, f"poisoned request served: {outputs}"


def test_an_exception_in_settle_still_ends_the_request(model):
    sound = random_adapter("sound", "loreft", (1,), 4, "f2+l2", model.config.hidden_size, seed=1)
    core = make_core(model, async_scheduling=True)
    core.add(seq("a", prompt(20, 1), sound, max_new_tokens=1))
    core.step()  # prefill with its edit check; a's only token in flight
    fail_nth_call(core.kv, "cache_full_blocks", 1)  # its first call: _settle, for a
    step_as_core_loop_does(core)
    drain(core)
    assert not core.has_work(), f"a never ends: {state(core)}"


def test_a_token_whose_blocks_cannot_be_indexed_is_delivered_with_the_error(model):
    """Every token a request counts reaches its client: usage and the stream agree."""
    core = make_core(model, async_scheduling=True)
    core.add(seq("a", prompt(15, 1), max_new_tokens=8))
    core.add(seq("b", prompt(9, 2), max_new_tokens=8))
    outputs = core.step() + core.step()  # a's and b's first tokens are read by the second step
    real = core.kv.cache_full_blocks

    def index(seq):  # fails once: indexing a's blocks after reading its second token
        if sys._getframe(1).f_code.co_name == "_append" and seq.request_id == "a" and seq.num_generated == 2:
            raise RuntimeError("planted fault")
        return real(seq)

    core.kv.cache_full_blocks = index
    outputs += step_as_core_loop_does(core) + drain(core)
    a = [o for o in outputs if o.request_id == "a"]
    assert a[-1].finish_reason is FinishReason.ERROR and a[-1].new_tokens, "the token comes with the error"
    assert sum(len(o.new_tokens) for o in a) == a[-1].num_generated == 2
    assert sum(len(o.new_tokens) for o in outputs if o.request_id == "b") == 8, "b is untouched"
