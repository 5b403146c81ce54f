"""The attention backends that read the KV pool in place against the sdpa backend, their reference: the
same greedy tokens and logits to ~1e-5 on mixed batches with adapters, chunked prefill, prefix-cache
hits, preemption, GQA, MHA and a sliding window. They are flex (FlexAttention) and paged (the paged
decode kernel's torch twin on CPU), the latter with and without its CUDA-graph path, which on CPU runs
the same padded persistent buffers uncaptured. For flex also: a block mask that lists every block a
query tile needs and none twice, and no read of a slot that the step's sequences do not own."""

import random
from functools import partial

import pytest
import torch
from pydantic import ValidationError

from server.config import Settings
from server.engine import attention
from server.engine.config import EngineConfig, resolve_attention_backend
from server.engine.model_runner import ModelRunner
from server.engine.paged_flex import QUERY_TILE, FlexStep, flex_kernel
from server.engine.transfers import StepUpload
from tests.engine_utils import load_engine_model, make_core, prompt, random_adapter, run_core, seq
from tests.test_engine_correctness import make_adapters, make_workload


class LogitsKeepingRunner(ModelRunner):
    """The real runner, keeping each step's logits for the comparison."""

    def __init__(self, *args, kept: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept = kept

    def run(self, chunks, pending=None):
        result = super().run(chunks, pending)
        self.kept.append(None if result.logits is None else result.logits.clone())  # graphs reuse their buffer
        return result


def run_backend(model, backend, requests, **config):
    logits = []
    core = make_core(model, make_runner=partial(LogitsKeepingRunner, kept=logits), attention_backend=backend, **config)
    tokens = run_core(core, [(seq(rid, p, adapter, max_new_tokens=new), t) for rid, p, adapter, t, new in requests])
    return core, tokens, logits


BACKENDS = {  # name -> (attention_backend, engine config)
    "flex": ("flex", {}),
    "paged": ("paged", {"cuda_graphs": False}),
    "paged-graphs": ("paged", {"cuda_graphs": True}),
    "paged-sdpa-first-chunks": ("paged", {"cuda_graphs": True}),  # first chunks of 8+ tokens through SDPA
}


@pytest.fixture(params=list(BACKENDS))
def backend(request, monkeypatch):
    if request.param == "paged-sdpa-first-chunks":
        monkeypatch.setattr(attention, "LONG_FIRST_CHUNK", 8)
    return BACKENDS[request.param]


def assert_backends_agree(model, backend, requests, **config):
    """Returns the run's core under test, for checks of what the workload exercised."""
    name, options = backend
    _, sdpa_tokens, sdpa_logits = run_backend(model, "sdpa", requests, **config)
    core, tokens, logits_seen = run_backend(model, name, requests, **config, **options)
    if options.get("cuda_graphs"):
        assert core.runner.graphs.steps_run > 0  # on CPU the graphs' padded buffers run uncaptured
    assert tokens == sdpa_tokens
    assert len(logits_seen) == len(sdpa_logits)
    for reference, logits in zip(sdpa_logits, logits_seen, strict=True):
        assert (reference is None) == (logits is None)
        if logits is not None:
            torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-5)
    return core


def mixed_requests(model, count, new_tokens=6):
    adapters = make_adapters(model.config.hidden_size, model.config.num_hidden_layers)
    return [(rid, p, adapter, t, new_tokens) for rid, p, adapter, t in make_workload(adapters, count)]


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return load_engine_model(tiny_model_dir("llama"))  # 4 heads over 2 KV heads: GQA


def test_mixed_batch_with_adapters_and_chunked_prefill(llama, backend):
    assert_backends_agree(llama, backend, mixed_requests(llama, 14), max_batched_tokens=32, max_num_seqs=8)


def test_prefix_cache_hits_and_preemption(llama, backend):
    rng = random.Random(3)
    adapter = random_adapter("lo", "loreft", (1, 2), 4, "f2+l2", llama.config.hidden_size, True, seed=5)
    prefixes = [prompt(length, 20 + length) for length in (17, 33)]
    requests = [
        (f"r{i}", rng.choice(prefixes) + prompt(rng.randint(1, 12), i)[1:], adapter if i % 2 else None, i, 12)
        for i in range(10)
    ]
    core = assert_backends_agree(llama, backend, requests, num_blocks=20, max_batched_tokens=24, max_model_len=64)
    assert core.kv.prefix_hits > 0 and core.scheduler.num_preemptions > 0


def test_multi_head_attention_gpt2(tiny_model_dir, backend):
    model = load_engine_model(tiny_model_dir("gpt2"))
    assert_backends_agree(model, backend, mixed_requests(model, 8), max_batched_tokens=40)


def test_sliding_window(tmp_path, backend):
    from server.models.tiny import build_tiny_model

    model = load_engine_model(build_tiny_model("mistral", tmp_path / "mistral", sliding_window=12))
    requests = [(f"r{i}", prompt(length, i), None, i, 10) for i, length in enumerate((3, 20, 41, 9, 60))]
    assert_backends_agree(model, backend, requests, max_batched_tokens=16)


def random_step(rng, block_size, num_pool_blocks, spans_wanted):
    """Spans over disjoint blocks but a prefix block shared by every third, decodes first, over several tiles."""
    from server.engine.attention import Span

    free = list(range(num_pool_blocks - 1))  # the last one is the pad block, never handed out
    rng.shuffle(free)
    shared = [free.pop()]
    spans, row = [], 0
    lengths = [1] * (spans_wanted - 3) + [rng.randint(2, 40), rng.randint(60, 90), rng.randint(100, 150)]
    for i, length in enumerate(lengths):
        start = rng.randint(0, 40) + (block_size if i % 3 == 0 else 0)
        blocks_needed = -(-(start + length) // block_size)
        table = (shared if i % 3 == 0 else []) + [free.pop() for _ in range(blocks_needed - (i % 3 == 0))]
        spans.append(Span(row, length, start, table))
        row += length
    return spans


def sent_flex_step(spans, block_size, num_pool_blocks, kernel) -> FlexStep:
    upload = StepUpload(torch.device("cpu"))
    step = FlexStep(spans, block_size, num_pool_blocks, upload, kernel)
    upload.send()
    return step


def allowed_slots(span, block_size, row_offset, sliding_window):
    position = span.start + row_offset
    oldest = 0 if sliding_window is None else max(0, position - sliding_window + 1)
    return {span.block_table[p // block_size] * block_size + p % block_size for p in range(oldest, position + 1)}


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_block_mask_is_exact_and_lists_each_needed_block_once(sliding_window):
    block_size, num_pool_blocks = 4, 200
    spans = random_step(random.Random(sliding_window or 0), block_size, num_pool_blocks, 12)
    step = sent_flex_step(spans, block_size, num_pool_blocks, flex_kernel("cpu"))
    assert step.num_rows > QUERY_TILE, "the step must span several query tiles"
    mask = step.block_mask(sliding_window)
    rows = torch.arange(step.num_rows)[:, None]
    slots = torch.arange(step.kv_len)[None, :]
    dense = mask.mask_mod(0, 0, rows, slots)
    for span in spans:
        for offset in range(span.length):
            got = set(dense[span.row + offset].nonzero().flatten().tolist())
            assert got == allowed_slots(span, block_size, offset, sliding_window)
    counts, indices = mask.kv_num_blocks[0, 0], mask.kv_indices[0, 0]
    for tile, count in enumerate(counts.tolist()):
        listed = indices[tile, :count].tolist()
        assert len(listed) == len(set(listed)), "a block listed twice would be counted twice"
        needed = dense[tile * QUERY_TILE : (tile + 1) * QUERY_TILE].view(-1, num_pool_blocks, block_size).any(-1)
        assert set(needed.any(0).nonzero().flatten().tolist()) <= set(listed)


def test_compiled_kernel_reads_only_the_steps_own_blocks():
    """Eager flex scores the whole pool (0 * NaN poisons it), so the compiled kernel shows the block list
    at work: NaN in every slot the step's sequences do not own, and the output equals a clean pool's."""
    torch.manual_seed(0)
    block_size, num_pool_blocks, heads, kv_heads, head_dim = 8, 64, 4, 2, 16
    spans = random_step(random.Random(1), block_size, num_pool_blocks, 6)
    keys = torch.randn(num_pool_blocks * block_size, kv_heads, head_dim)
    values = torch.randn_like(keys)
    queries = torch.randn(sum(s.length for s in spans), heads, head_dim)
    clean_step = sent_flex_step(spans, block_size, num_pool_blocks, flex_kernel("cpu"))
    clean = clean_step.attend(queries, keys, values, None, 6)
    owned = torch.zeros(num_pool_blocks, dtype=torch.bool)
    owned[[b for s in spans for b in s.block_table]] = True
    foreign = ~owned.repeat_interleave(block_size)
    keys[foreign], values[foreign] = float("nan"), float("nan")
    compiled = torch.compile(flex_kernel("cpu"), dynamic=False)
    poisoned = sent_flex_step(spans, block_size, num_pool_blocks, compiled).attend(queries, keys, values, None, 6)
    assert torch.isfinite(poisoned).all()
    torch.testing.assert_close(poisoned, clean, atol=1e-5, rtol=1e-5)


def test_paged_step_sends_long_first_chunks_to_sdpa_and_agrees_with_it(llama, monkeypatch):
    """Decode rows, a long first chunk, a long later chunk and a short first chunk: only the long first
    chunk goes to SDPA's causal kernel; every row equals the sdpa backend's, with NaN in every slot the
    step's sequences do not own."""
    from server.engine.attention import PagedStep, SdpaStep, Span
    from server.engine.kv_cache import KVCache, KVLayout

    monkeypatch.setattr(attention, "LONG_FIRST_CHUNK", 20)
    torch.manual_seed(0)
    block_size = 4
    shapes = [(1, 9), (1, 30), (24, 0), (25, 7), (6, 0)]  # (query tokens, cached tokens)
    spans, row, block = [], 0, 0
    for length, start in shapes:
        blocks = -(-(start + length) // block_size)
        spans.append(Span(row, length, start, list(range(block + 1, block + 1 + blocks))))  # block 0 stays foreign
        row, block = row + length, block + 1 + blocks
    kv = KVCache(KVLayout.from_config(llama.config, torch.float32), block + 2, block_size, "cpu", prefix_caching=False)
    owned = torch.zeros(kv.num_blocks + 1, dtype=torch.bool)
    owned[[b for s in spans for b in s.block_table]] = True
    for pool in (kv.block_keys(0), kv.block_values(0)):
        pool.normal_()
        pool[~owned] = float("nan")
        pool[kv.pad_block] = 0  # what the pool's pad block always holds
    queries = torch.randn(row, llama.config.num_attention_heads, kv.layout.head_dim)
    upload = StepUpload(torch.device("cpu"))
    paged, sdpa = PagedStep(kv, spans, row, upload), SdpaStep(kv, spans, row, upload)
    upload.send()
    assert [group.shape for group in paged.long] == [(1, 24, 24)]
    torch.testing.assert_close(paged.attend(0, queries, None, None), sdpa.attend(0, queries, None, None))


def test_without_triton_cuda_falls_back_to_sdpa_and_refuses_paged(monkeypatch):
    from server.engine import config

    monkeypatch.setattr(config, "triton_available", lambda: False)
    assert resolve_attention_backend("auto", "cuda") == "sdpa"
    with pytest.raises(ValueError, match="install triton, or use sdpa"):
        resolve_attention_backend("paged", "cuda")
    assert resolve_attention_backend("paged", "cpu") == "paged"  # the torch twins need no Triton


def test_the_setting_picks_the_backend_and_refuses_others(monkeypatch):
    from server.engine import config

    monkeypatch.setattr(config, "triton_available", lambda: True)
    assert Settings().engine_config("cpu").attention_backend == "auto"
    assert resolve_attention_backend("auto", "cpu") == "sdpa" and resolve_attention_backend("auto", "cuda") == "paged"
    monkeypatch.setenv("REFT_ATTENTION_BACKEND", "flex")
    assert Settings().engine_config("cpu").attention_backend == "flex"
    with pytest.raises(ValidationError, match="sdpa"):
        Settings(attention_backend="warp")
    with pytest.raises(ValueError, match="attention_backend must be one of auto, sdpa, paged, flex"):
        EngineConfig(attention_backend="warp")
