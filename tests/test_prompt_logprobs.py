"""Prompt logprobs in the engine: every prompt token after the first scored once, equal to the slow
reference's log-distribution (the adapter applied by hooks) whatever the chunking, the batch, the step
mode, a preemption or a warm prefix cache; and asking for them changes no request's tokens."""

import random

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.kv_cache import KVCache, KVLayout
from server.reft.reference import reference_generate, reference_prompt_logprobs
from tests.engine_utils import make_core, prompt, random_adapter, run_core, seq

TOP = 3


def run(core, sequences) -> dict:
    """Each request's (generated tokens, prompt logprobs or None), the prompt logprobs delivered at most once."""
    for sequence in sequences:
        core.add(sequence)
    results: dict = {}
    while core.has_work():
        for output in core.step():
            tokens, scored = results.get(output.request_id, ([], None))
            if output.prompt_logprobs is not None:
                assert scored is None, "prompt logprobs delivered twice"
                scored = output.prompt_logprobs
            results[output.request_id] = (tokens + output.new_tokens, scored)
    return results


def own_scores(reference: torch.Tensor, prompt_ids: list[int]) -> torch.Tensor:
    """Each prompt token's logprob (after the first) in the reference's log-distributions."""
    return reference.gather(1, torch.tensor(prompt_ids[1:])[:, None])[:, 0]


def assert_matches_reference(samples, reference: torch.Tensor, prompt_ids: list[int]) -> None:
    assert [s.token for s in samples] == prompt_ids[1:]
    expected = own_scores(reference, prompt_ids)
    assert torch.allclose(torch.tensor([s.logprob for s in samples]), expected, atol=1e-4)
    for sample, row in zip(samples, reference, strict=True):
        values, ids = row.topk(TOP)
        assert [token for token, _ in sample.top_logprobs] == ids.tolist()
        assert torch.allclose(torch.tensor([v for _, v in sample.top_logprobs]), values, atol=1e-4)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_mixed_batch_scores_every_prompt_token_as_the_reference(models, async_scheduling):
    """Chunks of 24 tokens split the longer prompts over steps, next to decodes and requests that score nothing."""
    model, reference_model = models
    hidden = model.config.hidden_size
    adapters = [random_adapter(f"a{i}", "loreft", (0, 2), 4, "f3+l3", hidden, seed=i) for i in range(2)]
    lengths = [1, 2, 5, 23, 24, 25, 40, 70]
    requests = []
    for i, length in enumerate(lengths):
        adapter = adapters[i % 3] if i % 3 < 2 else None
        scored = TOP if i % 4 != 3 else None
        requests.append((f"r{i}", prompt(length, i), adapter, scored))
    core = make_core(model, max_batched_tokens=24, async_scheduling=async_scheduling)
    results = run(core, [seq(rid, p, a, max_new_tokens=4, prompt_logprobs=n) for rid, p, a, n in requests])
    for rid, prompt_ids, adapter, scored in requests:
        tokens, samples = results[rid]
        assert tokens == reference_generate(reference_model, prompt_ids, adapter, max_new_tokens=4)
        if scored is None:
            assert samples is None
        else:
            reference = reference_prompt_logprobs(reference_model, prompt_ids, adapter)
            assert_matches_reference(samples, reference, prompt_ids)


def test_a_cached_prefix_is_scored_all_the_same(models):
    """A prompt the prefix cache holds is computed again for a request that scores it (cached positions have
    no logits); one that does not score it still starts from the cache."""
    model, reference_model = models
    prompt_ids = prompt(50, 7)
    core = make_core(model)
    run(core, [seq("warm", prompt_ids, max_new_tokens=1)])
    hits = core.kv.prefix_hits
    results = run(core, [seq("scored", prompt_ids, max_new_tokens=1, prompt_logprobs=TOP)])
    assert core.kv.prefix_hits == hits
    assert_matches_reference(results["scored"][1], reference_prompt_logprobs(reference_model, prompt_ids), prompt_ids)
    run(core, [seq("plain", prompt_ids, max_new_tokens=1)])
    assert core.kv.prefix_hits > hits


def test_a_preempted_request_scores_each_token_once(models):
    """A pool too small for every request preempts and recomputes some: their prompt logprobs still come
    once each, complete, and equal the reference's; recomputed once scored, a prompt comes from the cache."""
    model, reference_model = models
    prompts = {f"r{i}": prompt(60, 20 + i) for i in range(4)}
    core = make_core(model, num_blocks=24, block_size=8, max_batched_tokens=32, max_num_seqs=4, max_model_len=120)
    results = run(core, [seq(rid, p, max_new_tokens=40, prompt_logprobs=TOP) for rid, p in prompts.items()])
    assert core.scheduler.num_preemptions > 0 and core.kv.prefix_hits > 0
    for rid, prompt_ids in prompts.items():
        tokens, samples = results[rid]
        assert tokens == reference_generate(reference_model, prompt_ids, max_new_tokens=40)
        assert_matches_reference(samples, reference_prompt_logprobs(reference_model, prompt_ids), prompt_ids)


def test_top_zero_gives_the_prompt_tokens_own_logprobs_alone(models):
    model, reference_model = models
    prompt_ids = prompt(9, 3)
    core = make_core(model)
    samples = run(core, [seq("r", prompt_ids, max_new_tokens=1, prompt_logprobs=0)])["r"][1]
    reference = reference_prompt_logprobs(reference_model, prompt_ids)
    expected = own_scores(reference, prompt_ids)
    assert torch.allclose(torch.tensor([s.logprob for s in samples]), expected, atol=1e-4)
    assert all(s.top_logprobs == [] for s in samples)


def test_the_warm_up_step_that_sizes_the_kv_pool_scores_its_prompt(models):
    """A step may score every prompt token of its budget: the warm-up step whose peak memory the KV pool's
    sizing leaves room for keeps their logits too."""
    model, _ = models
    config = EngineConfig(max_batched_tokens=48, num_blocks=8, block_size=8)
    layout = KVLayout.from_config(model.config, torch.float32)
    result = EngineCore._warm_up_step(model, layout, config, None)
    assert result.prompt_logits.shape == (47, model.config.vocab_size) and sum(s.count for s in result.scored) == 47


def test_a_request_preempted_mid_prompt_reuses_only_what_it_scored(models):
    """Found by fuzzing: a scoring request preempted part way through its prompt, whose blocks' cache keys
    were known beyond what it had scored, took those blocks back and skipped scoring their positions. It
    may take only the blocks it scored: every prompt token is scored, once."""
    model, reference_model = models
    rng = random.Random(3180)
    base = [rng.randrange(3, 200) for _ in range(64)]
    core = make_core(model, num_blocks=11, block_size=4, max_batched_tokens=8, max_num_seqs=4, max_model_len=40)
    shapes = [(10, None, 3, 0), (24, 1, 11, 0), (20, 1, 8, 1), (24, None, 8, 2), (8, 1, 3, 1), (24, 1, 2, 1)]
    requests = [
        (seq(f"r{i}", base[:n], max_new_tokens=m, prompt_logprobs=k), t) for i, (n, k, m, t) in enumerate(shapes)
    ]
    scored = {}
    run_core(core, requests, scored=scored)
    assert core.scheduler.num_preemptions > 0
    for sequence, _ in requests:
        if sequence.sampling.prompt_logprobs is not None:
            reference = reference_prompt_logprobs(reference_model, sequence.prompt_ids)
            expected = own_scores(reference, sequence.prompt_ids)
            assert torch.allclose(torch.tensor(scored[sequence.request_id]), expected, atol=1e-4), sequence.request_id


def test_a_request_that_has_scored_its_prompt_takes_its_generated_blocks_back_from_the_cache(models):
    """Positions past the prompt score nothing: once its whole prompt is scored, a request preempted while it
    generates takes back every cached block a request that scores nothing would."""
    kv = KVCache(KVLayout.from_config(models[0].config, torch.float32), 8, 8)
    scoring = seq("scoring", prompt(10, 4), max_new_tokens=40, prompt_logprobs=TOP)
    scoring.token_ids += [5] * 20
    kv.allocate(scoring, 30)
    scoring.num_computed, scoring.num_prompt_scored = 29, 9
    kv.cache_full_blocks(scoring)
    kv.free(scoring)  # preempted
    scoring.num_computed = 0
    kv.reuse_prefix(scoring)
    assert scoring.num_computed == 24
