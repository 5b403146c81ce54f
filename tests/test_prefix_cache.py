"""Prefix caching: reused K/V must give exactly the tokens of a full recompute (the reference), and
must never cross adapters, adapter versions, or prefixes that an adapter edited at other positions."""

import random

import pytest
import torch

from server.engine.kv_cache import KVCache, KVLayout
from server.engine.sequence import FinishReason
from server.reft.interventions import Intervention
from server.reft.reference import reference_generate
from tests.engine_utils import make_core, prompt, random_adapter, run_core, seq

BLOCK = 8


@pytest.fixture(scope="module")
def adapter(models):
    return random_adapter("chat", "loreft", (0, 2), 4, "f3+l3", models[0].config.hidden_size, seed=5)


def served(core, request_id, tokens, adapter=None, max_new_tokens=8):
    """Serve one request alone; returns (generated ids, prompt tokens reused from the cache)."""
    hits_before = core.kv.prefix_hits
    out = run_core(core, [(seq(request_id, tokens, adapter, max_new_tokens=max_new_tokens), 0)])[request_id]
    return out, core.kv.prefix_hits - hits_before


def expected(models, tokens, adapter=None, max_new_tokens=8):
    return reference_generate(models[1], tokens, adapter, max_new_tokens=max_new_tokens)


def test_a_shared_prefix_is_reused_and_gives_the_reference_tokens(models, adapter):
    core = make_core(models[0], block_size=BLOCK)
    system = prompt(40, 1)  # five full blocks
    short = system + [100, 101, 102]
    out, hits = served(core, "short", short, adapter)
    assert out == expected(models, short, adapter) and hits == 0
    for i, tail in enumerate([[7] * 30, [9, 8, 7], list(range(50, 70))]):
        longer = system + tail
        out, hits = served(core, f"longer{i}", longer, adapter)
        assert out == expected(models, longer, adapter)
        assert hits == 40  # the system prompt's five blocks: f3 edits alike, the l3 edits are past them
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_a_block_holding_another_prompts_suffix_edits_is_not_reused(models, adapter):
    """The 24-token prompt's last three positions (21-23, edited by l3) end its third block; a longer
    prompt with the same 24 tokens leaves them unedited, so only the first two blocks are shared."""
    core = make_core(models[0], block_size=BLOCK)
    head = prompt(24, 2)
    assert served(core, "head", head, adapter)[0] == expected(models, head, adapter)
    longer = head + [33] * 12
    out, hits = served(core, "longer", longer, adapter)
    assert out == expected(models, longer, adapter) and hits == 16


def test_no_sharing_across_adapters_versions_or_the_base_model(models, adapter):
    hidden = models[0].config.hidden_size
    other = random_adapter("chat", "loreft", (0, 2), 4, "f3+l3", hidden, version=2, seed=6)
    core = make_core(models[0], block_size=BLOCK)
    tokens = prompt(50, 3)
    assert served(core, "base", tokens) == (expected(models, tokens), 0)
    assert served(core, "v1", tokens, adapter) == (expected(models, tokens, adapter), 0)
    assert served(core, "v2", tokens, other) == (expected(models, tokens, other), 0)
    for name, which in (("base again", None), ("v1 again", adapter), ("v2 again", other)):
        assert served(core, name, tokens, which) == (expected(models, tokens, which), 48)


def test_an_adapter_evicted_and_reloaded_reuses_its_cached_prefixes(models, adapter):
    """The chain is keyed by the adapter's content: a new object with the same weights (a reload after
    LRU eviction) hits; the same name and version with other weights does not."""
    hidden = models[0].config.hidden_size
    reloaded = random_adapter("chat", "loreft", (0, 2), 4, "f3+l3", hidden, seed=5)
    impostor = random_adapter("chat", "loreft", (0, 2), 4, "f3+l3", hidden, seed=9)
    assert reloaded is not adapter and reloaded.digest == adapter.digest != impostor.digest
    core = make_core(models[0], block_size=BLOCK)
    tokens = prompt(40, 8)
    first = served(core, "first", tokens, adapter)
    assert served(core, "reloaded", tokens, reloaded) == (first[0], 32)
    assert served(core, "impostor", tokens, impostor) == (expected(models, tokens, impostor), 0)


def test_an_identical_prompt_recomputes_only_its_last_token(models, adapter):
    core = make_core(models[0], block_size=BLOCK)
    tokens = prompt(32, 4)  # block aligned: the last block is recomputed for its last token's logits
    first = served(core, "first", tokens, adapter)
    assert first[0] == expected(models, tokens, adapter)
    assert served(core, "again", tokens, adapter) == (first[0], 24)


def test_generated_tokens_are_cached_for_the_next_turn(models):
    core = make_core(models[0], block_size=BLOCK)
    turn = prompt(13, 5)
    reply, _ = served(core, "turn1", turn, max_new_tokens=20)
    follow_up = turn + reply + [44, 45, 46]
    out, hits = served(core, "turn2", follow_up)
    assert out == expected(models, follow_up) and hits == 32  # turn 1 computed 13 + 19 tokens: four blocks


def test_mixed_batches_under_eviction_and_preemption_stay_exact(models, adapter):
    """Many prompts over a few shared prefixes, in a pool too small to hold them: cached blocks get
    evicted and reused for new content, sequences get preempted, and every output stays exact."""
    hidden = models[0].config.hidden_size
    adapters = [adapter, random_adapter("short", "noreft", (1,), 2, "l2", hidden, seed=7), None]
    prefixes = [prompt(length, 10 + length) for length in (17, 32, 45)]
    rng = random.Random(0)
    workload = []
    for i in range(30):
        tokens = rng.choice(prefixes) + [rng.randrange(3, 259) for _ in range(rng.randint(0, 20))]
        workload.append((f"r{i}", tokens, adapters[i % 3], rng.randint(0, 12)))
    core = make_core(
        models[0], block_size=BLOCK, num_blocks=28, max_num_seqs=8, max_batched_tokens=48, max_model_len=128
    )
    out = run_core(core, [(seq(rid, tokens, a, max_new_tokens=6), t) for rid, tokens, a, t in workload])
    for rid, tokens, a, _ in workload:
        assert out[rid] == expected(models, tokens, a, max_new_tokens=6), rid
    assert core.kv.prefix_hits > 0 and core.scheduler.num_preemptions > 0
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_prefix_caching_off_reuses_nothing(models, adapter):
    core = make_core(models[0], block_size=BLOCK, prefix_caching=False)
    tokens = prompt(40, 6)
    first = served(core, "a", tokens, adapter)
    assert first == served(core, "b", tokens, adapter) == (expected(models, tokens, adapter), 0)
    assert core.kv.prefix_queries == 0


def test_a_request_whose_adapter_failed_leaves_nothing_in_the_cache(models, adapter):
    """Its K/V lack the edit: a later request for the same prefix must recompute, not reuse them."""
    hidden = models[0].config.hidden_size
    flaky = random_adapter("flaky", "loreft", (1,), 4, "f2+l2", hidden, seed=8)
    working = flaky.layers[1][0]
    flaky.layers[1][0] = Intervention(working.kind, working.act, dict(working.params, rotation=torch.zeros(3, 4)))
    core = make_core(models[0], block_size=BLOCK)
    tokens = prompt(40, 7)
    core.add(seq("fails", tokens, flaky))
    reasons = [o.finish_reason for _ in range(10) for o in core.step()]
    assert FinishReason.ERROR in reasons
    flaky.layers[1][0] = working  # the fault was transient
    assert served(core, "retry", tokens, flaky) == (expected(models, tokens, flaky), 0)


def prefill_tokens(core, requests: list) -> tuple[dict, int]:
    """Serve `requests` ((sequence, arrival step) pairs); returns their tokens and the prompt tokens computed."""
    computed, step = 0, 0
    pending = sorted(requests, key=lambda request: request[1])
    tokens: dict = {}
    while pending or core.has_work():
        while pending and pending[0][1] <= step:
            core.add(pending.pop(0)[0])
        for output in core.step():
            tokens.setdefault(output.request_id, []).extend(output.new_tokens)
        computed += core.last_step.num_prefill_tokens if core.last_step else 0
        step += 1
    return tokens, computed


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_twins_arriving_together_compute_their_shared_prompt_once(models, adapter, async_scheduling):
    """Eight requests for one prompt (n choices of it), base and edited, arriving at once: the first computes
    the prompt, the others wait for its blocks to enter the cache (an edited one's once its check is read)
    and compute only their last block's tokens. Each still gets the reference's tokens."""
    tokens = prompt(50, 11)  # six full blocks before the one holding the last token
    for which in (None, adapter):
        core = make_core(models[0], block_size=BLOCK, async_scheduling=async_scheduling)
        twins = [(seq(f"t{i}", tokens, which, max_new_tokens=4), 0) for i in range(8)]
        out, computed = prefill_tokens(core, twins)
        assert computed == 50 + 7 * 2
        want = expected(models, tokens, which, max_new_tokens=4)
        assert all(generated == want for generated in out.values())


def test_a_twin_waits_only_while_its_block_is_in_the_making(models, adapter):
    """With async scheduling an edited prompt's blocks enter the cache once the step's edit check is read: a
    twin admitted meanwhile waits, with the requests behind it. If the request computing the blocks is
    aborted before then, they never enter the cache, and the twin goes ahead and computes them itself."""
    tokens, behind = prompt(50, 12), prompt(20, 13)
    core = make_core(models[0], block_size=BLOCK, async_scheduling=True)
    for request_id, which in (("leader", tokens), ("twin", tokens), ("behind", behind)):
        core.add(seq(request_id, which, adapter, max_new_tokens=4))
    core.step()
    assert [s.request_id for s in core.scheduler.waiting] == ["twin", "behind"]
    core.abort("leader")
    out = run_core(core, [])
    assert out["twin"] == expected(models, tokens, adapter, max_new_tokens=4)
    assert out["behind"] == expected(models, behind, adapter, max_new_tokens=4)


@pytest.mark.parametrize("scoring", [False, True])
def test_a_sequence_back_from_a_preemption_takes_no_block_a_twin_only_looked_ahead_to(models, scoring):
    """A twin waiting for the next block of a sequence still computing its prompt makes that sequence's key
    of the block. Preempted before computing it, the sequence comes back once another has cached the block:
    it takes only the blocks it may, neither the one holding its last token (there would be none left to
    sample from) nor, scoring its prompt, one whose positions it has not scored."""
    kv = KVCache(KVLayout.from_config(models[0].config, torch.float32), 16, BLOCK)
    tokens = prompt(2 * BLOCK if not scoring else 3 * BLOCK, 21)
    leader = seq("leader", tokens, prompt_logprobs=1 if scoring else None)
    kv.allocate(leader, BLOCK + 4)  # its first chunk: a block and a half
    leader.num_computed = leader.num_prompt_scored = BLOCK + 4
    kv.cache_full_blocks(leader)
    twin = seq("twin", tokens + [5] * BLOCK)
    kv.reuse_prefix(twin)
    assert kv.next_block_in_the_making(twin, [leader])  # the twin waits for the leader's second block
    kv.free(twin)
    twin.num_computed = 0
    kv.free(leader)  # preempted
    leader.num_computed = 0
    kv.reuse_prefix(twin)  # the twin goes ahead and computes the block itself
    kv.allocate(twin, len(twin.token_ids))
    twin.num_computed = len(twin.token_ids)
    kv.cache_full_blocks(twin)
    kv.reuse_prefix(leader)
    assert leader.num_computed == BLOCK
