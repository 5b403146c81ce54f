"""The GPU engine on a CUDA device (skipped elsewhere; bench/gpu.sh runs these first on a GPU machine).

In float32 the paged backend, eager and replayed from CUDA graphs (of the forward as it is, and as
Inductor compiled it, with the eager steps' layers compiled too), with and without async scheduling and
padded eager steps, gives the sdpa backend's greedy tokens on a mixed workload with adapters, chunked prefill and a pool
too small for everyone at once; every bucket's graph is captured and the replays serve the decode
steps; the Triton kernels (decode, prefill) match their torch twins, and the rotary kernel gives
transformers' own bits; masked GQA prefill stays on SDPA's fused kernels.
Rows held to grammars (structured outputs) draw as on the sdpa path.
Async scheduling keeps its tokens with the device lagging behind the host, and its launches never
synchronize with the device: decode steps (graph replays) and steps that prefill (eager, with
adapters' edits, with and without compiled layers); nor does an adapter's arrival on the device. A
prompt's long first chunk goes to SDPA's flash kernel in 16 bits only.
"""

import random
from dataclasses import replace

import pytest
import torch

from server.adapters.materialize import materialize
from server.adapters.random_adapters import random_adapter_file
from server.engine.compiled_layers import compile_layers
from server.engine.paged_decode import paged_decode_reference
from server.engine.paged_prefill import paged_prefill_reference, prefill_tiles
from tests.engine_utils import load_engine_model, make_core, run_core, seq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_llama(tiny_model_dir):
    return load_engine_model(tiny_model_dir("llama")).cuda()


def workload(model, count=24):
    rng = random.Random(0)
    hidden = model.config.hidden_size
    adapters = [
        materialize(random_adapter_file("loreft", (1, 2), 4, "f3+l3", hidden, seed=i), name=f"a{i}", device="cuda")
        for i in range(3)
    ]
    requests = []
    for i in range(count):
        prompt = [1] + [rng.randrange(3, 259) for _ in range(rng.randint(1, 90))]
        adapter = (adapters + [None])[i % 4]
        requests.append((seq(f"r{i}", prompt, adapter, max_new_tokens=rng.randint(4, 24)), rng.randint(0, 12)))
    return requests


def run(model, **config):
    core = make_core(model, **{"num_blocks": 96, "max_batched_tokens": 96, "max_num_seqs": 12, **config})
    return core, run_core(core, workload(model))


@pytest.mark.parametrize(
    "cuda_graphs, compile_backend, async_scheduling, multiple",
    [
        (False, None, False, 1),
        (True, None, False, 1),
        (True, "inductor", False, 1),
        (True, None, True, 1),
        (False, None, True, 1),
        (True, None, True, 64),
    ],
)
def test_paged_backend_gives_sdpa_tokens(cuda_llama, cuda_graphs, compile_backend, async_scheduling, multiple):
    _, expected = run(cuda_llama, attention_backend="sdpa")
    config = {"cuda_graphs": cuda_graphs, "compile_backend": compile_backend, "async_scheduling": async_scheduling}
    core, tokens = run(cuda_llama, attention_backend="auto", step_token_multiple=multiple, **config)
    assert core.runner.attention_backend == "paged"
    assert tokens == expected
    graphs = core.runner.graphs
    if cuda_graphs:
        assert sorted(graphs.graphs) == graphs.sizes and graphs.steps_run > 0
    else:
        assert graphs is None
    if compile_backend is not None:  # neither the decode graphs nor the eager steps' layers fell back
        assert graphs._compiled is not None and not compile_layers(cuda_llama, compile_backend).failed


def test_prompt_logprobs_on_the_gpu_path_equal_the_sdpa_paths(cuda_llama):
    """Prompts scored over several chunks next to graph-replayed decodes, with async scheduling (the GPU's
    defaults): the paged backend's prompt logprobs equal the sdpa backend's, as do every request's tokens."""

    def scored_run(**config):
        requests = [(s, t) for s, t in workload(cuda_llama)]
        for i, (sequence, _) in enumerate(requests):
            sequence.sampling = replace(sequence.sampling, prompt_logprobs=2 if i % 2 else None)
        core = make_core(cuda_llama, num_blocks=96, max_batched_tokens=40, max_num_seqs=12, **config)
        scored = {}
        for sequence, _ in requests:
            core.add(sequence)
        while core.has_work():
            for output in core.step():
                if output.prompt_logprobs is not None:
                    scored[output.request_id] = [(s.token, s.logprob, s.top_logprobs) for s in output.prompt_logprobs]
        return {s.request_id: s.token_ids for s, _ in requests}, scored

    expected_tokens, expected = scored_run(attention_backend="sdpa")
    tokens, scored = scored_run(attention_backend="auto", cuda_graphs=True, async_scheduling=True)
    assert tokens == expected_tokens and scored.keys() == expected.keys()
    for request_id, samples in scored.items():
        want = expected[request_id]
        assert [token for token, _, _ in samples] == [token for token, _, _ in want]
        assert [logprob for _, logprob, _ in samples] == pytest.approx([logprob for _, logprob, _ in want], abs=1e-4)
        assert [top[0][0] for _, _, top in samples] == [top[0][0] for _, _, top in want]


def test_structured_outputs_on_the_gpu_path_equal_the_sdpa_paths(cuda_llama, tiny_model_dir):
    """Rows held to grammars (their masks made in pinned memory, copied without waiting) next to plain rows,
    on the GPU's defaults (paged, graphs, async scheduling): the tokens of the sdpa backend, run synchronously."""
    import llguidance
    from transformers import AutoTokenizer

    from server.engine.grammar import Grammars

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    grammars = Grammars(tokenizer, cuda_llama.config.vocab_size, {2})
    regex = llguidance.LLMatcher.grammar_from_regex("[0-9]{2,6}")

    def held_run(**config):
        requests = workload(cuda_llama)
        for i, (sequence, _) in enumerate(requests):
            sequence.sampling = replace(sequence.sampling, grammar=regex if i % 3 == 0 else None)
        core = make_core(cuda_llama, eos={2}, grammars=grammars, num_blocks=96, max_batched_tokens=40, **config)
        return run_core(core, requests)

    expected = held_run(attention_backend="sdpa")
    assert held_run(attention_backend="auto", cuda_graphs=True, async_scheduling=True) == expected
    held = [tokens for request_id, tokens in expected.items() if int(request_id[1:]) % 3 == 0]
    assert all(tokenizer.decode([t for t in tokens if t != 2]).isdigit() for tokens in held)


def test_triton_kernel_matches_its_twin_on_cuda():
    from server.engine.paged_decode_triton import paged_decode_triton

    torch.manual_seed(0)
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)):
        keys = torch.randn(40 * 16, 8, 64, device="cuda").to(dtype)
        values = torch.randn_like(keys)
        context = torch.tensor([1, 16, 17, 300, 640], device="cuda")
        tables = torch.stack([torch.randperm(40, device="cuda") for _ in range(5)])
        queries = torch.randn(5, 32, 64, device="cuda").to(dtype)
        for window in (None, 100):
            args = (queries, keys, values, tables, context, 16, 0.125, window)
            kernel = paged_decode_triton(torch.empty_like(queries), *args)
            twin = paged_decode_reference(torch.empty_like(queries), *args)
            torch.testing.assert_close(kernel.float(), twin.float(), atol=atol, rtol=0)


def test_triton_prefill_kernel_matches_its_twin_on_cuda():
    """Llama-3.2-1B's attention shape: 32 query heads over 8 KV heads of 64."""
    from server.engine.paged_prefill_triton import paged_prefill_triton

    torch.manual_seed(0)
    chunks = [(0, 2, 0), (2, 300, 0), (302, 77, 160), (379, 130, 500)]  # row, length, start
    tiles = torch.from_numpy(prefill_tiles(chunks, 16)).cuda()
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)):
        keys = torch.randn(48 * 16, 8, 64, device="cuda").to(dtype)
        values = torch.randn_like(keys)
        tables = torch.stack([torch.randperm(48, device="cuda")[:40] for _ in chunks])
        queries = torch.randn(32, 509, 64, device="cuda").to(dtype).transpose(0, 1)  # HF's [T, H, D] view
        for window in (None, 100):
            args = (queries, keys, values, tables, tiles, 16, 16, 0.125, window)
            kernel = paged_prefill_triton(torch.zeros_like(queries), *args)
            twin = paged_prefill_reference(torch.zeros_like(queries), *args)
            torch.testing.assert_close(kernel.float(), twin.float(), atol=atol, rtol=0)


def test_rotary_kernel_gives_transformers_bits_on_cuda(cuda_llama):
    """The engine routes Llama's rotation through the fused kernel (fused_rotary.py), whose every bit equals
    transformers' own function's, in each dtype, for a prefill step's tokens and a decode step's."""
    import transformers.models.llama.modeling_llama as llama

    from server.engine.fused_norms import same_bits
    from server.engine.fused_rotary import FusedRotary

    make_core(cuda_llama)
    assert isinstance(llama.apply_rotary_pos_emb, FusedRotary)
    original = llama.apply_rotary_pos_emb.original
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for tokens in (1, 300):
            q, k = (4 * torch.randn(1, tokens, heads, 64, device="cuda") for heads in (32, 8))
            for x in (q, k):  # zeros of both signs, and below angles of 0: where a zero's sign can go astray
                x.view(-1)[::5], x.view(-1)[1::7] = 0.0, -0.0
            q, k = (x.to(dtype).transpose(1, 2) for x in (q, k))
            angles = torch.rand(1, tokens, 32, device="cuda") * tokens
            angles.view(-1)[::3] = 0.0
            cos, sin = (torch.cat((f(angles), f(angles)), dim=-1).to(dtype) for f in (torch.cos, torch.sin))
            fused, expected = llama.apply_rotary_pos_emb(q, k, cos, sin), original(q, k, cos, sin)
            assert all(map(same_bits, fused, expected)), (dtype, tokens)
    assert not llama.apply_rotary_pos_emb.failed  # the kernel ran: a failed launch would have compared the original
    q.requires_grad_(True)  # the kernel has no backward: a rotation that needs one is the original's
    assert original(q, k, cos, sin)[0].grad_fn is not None and llama.apply_rotary_pos_emb(q, k, cos, sin)[0].grad_fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loreft_kernel_edits_as_the_torch_formula_on_cuda(monkeypatch, dtype):
    """A step's plan over 9 adapters (most sharing a batch, one spanning several segments) edits the rows through
    the fused kernel, as the torch formula does (to a rounding step in bf16), and a row's edit does not depend
    on what else is in the batch."""
    from server.reft import fused_loreft
    from server.reft.plan import build_plan
    from server.reft.request_edit import request_edit

    hidden_size = 256
    adapters = [
        materialize(
            random_adapter_file("loreft", (0, 1), 4, "f5+l5", hidden_size, share_weights=False, seed=i, scale=0.5),
            name=f"a{i}",
            dtype=dtype,
            device="cuda",
        )
        for i in range(9)
    ]
    requests = [(adapters[0], 40)] * 4 + [(a, 12 + 3 * i) for i, a in enumerate(adapters[1:])]
    chunks, row = [], 0
    for i, (adapter, length) in enumerate(requests):
        chunks.append(request_edit(adapter, length).rows(f"r{i}", row, 0, length))
        row += length
    hidden = (4 * torch.randn(row, hidden_size, device="cuda")).to(dtype)
    launched = []

    def edited(plan_chunks, fused: bool):
        monkeypatch.setattr(fused_loreft, "_failed", not fused)
        plan, out = build_plan(plan_chunks, "cuda"), hidden.clone()
        for layer in (0, 1):
            plan.apply(layer, out)
        assert not plan.failures
        return out

    takes = fused_loreft._kernel_takes
    monkeypatch.setattr(fused_loreft, "_kernel_takes", lambda *a: launched.append(takes(*a)) or launched[-1])
    kernel = edited(chunks, fused=True)
    assert launched and all(launched)  # every batch of the plan went to the kernel
    formula = edited(chunks, fused=False)
    # a rounding step at the largest value in bf16; in fp32 the sums' order shows (run G: 1.6e-5 at values near 20)
    relative = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    step = relative * formula.float().abs().max().item()
    torch.testing.assert_close(kernel.float(), formula.float(), atol=step, rtol=0)
    alone = edited(chunks[-1:], fused=True)
    last_row = chunks[-1].first_row
    assert torch.equal(alone[last_row:], kernel[last_row:])


def test_masked_gqa_prefill_keeps_to_fused_kernels():
    """Prefill chunks past position 0 need a mask; with GQA on CUDA that would push SDPA onto its math
    kernel (scores materialised): the sdpa groups must run with math disallowed, and agree with it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from server.engine.attention import SdpaStep, Span
    from server.engine.kv_cache import KVCache, KVLayout
    from server.engine.transfers import StepUpload

    torch.manual_seed(0)
    kv = KVCache(KVLayout(1, 2, 64, torch.bfloat16), 16, 16, "cuda")
    kv.keys.normal_(), kv.values.normal_()
    spans = [Span(0, 40, 20, [3, 4, 5, 6]), Span(40, 24, 8, [7, 8])]  # chunks after cached tokens
    upload = StepUpload(torch.device("cuda"))
    step = SdpaStep(kv, spans, 64, upload)
    upload.send()
    queries = torch.randn(64, 8, 64, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        fused = step.attend(0, queries, None, None)
    with sdpa_kernel([SDPBackend.MATH]):
        math = step.attend(0, queries, None, None)
    torch.testing.assert_close(fused.float(), math.float(), atol=2e-2, rtol=0)


def test_long_first_chunks_go_to_sdpa_only_where_a_fused_kernel_takes_them(monkeypatch):
    """In 16 bits (sm80+) a long first chunk with GQA attends in SDPA's flash kernel, math disallowed, and
    agrees with the paged prefill kernel; in float32 it stays with the paged kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from server.engine import attention
    from server.engine.attention import PagedStep, Span
    from server.engine.kv_cache import KVCache, KVLayout
    from server.engine.transfers import StepUpload

    torch.manual_seed(0)
    spans = [Span(0, 1, 30, [0, 1]), Span(1, 80, 0, [2, 3, 4, 5, 6]), Span(81, 20, 0, [7, 8])]
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        kv = KVCache(KVLayout(1, 2, 64, dtype), 16, 16, "cuda")
        kv.keys.normal_(), kv.values.normal_()
        queries = torch.randn(101, 8, 64, device="cuda", dtype=dtype)
        for threshold in (64, 10_000):  # the 80-token first chunk to SDPA, then to the paged kernel
            monkeypatch.setattr(attention, "LONG_FIRST_CHUNK", threshold)
            upload = StepUpload(torch.device("cuda"))
            step = PagedStep(kv, spans, 101, upload)
            upload.send()
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                results[dtype, threshold] = (len(step.long), step.attend(0, queries, None, None).float())
    assert [results[dtype, 64][0] for dtype in (torch.bfloat16, torch.float32)] == [1, 0]
    torch.testing.assert_close(results[torch.bfloat16, 64][1], results[torch.bfloat16, 10_000][1], atol=2e-2, rtol=0)


def test_auto_kv_sizing_keeps_room_for_the_decode_graphs(cuda_llama, caplog):
    with caplog.at_level("INFO", logger="server.engine.memory"):
        core, tokens = run(cuda_llama, num_blocks=None, kv_cache_bytes=None, gpu_memory_utilization=0.5)
    sized = next(r for r in caplog.records if r.getMessage() == "KV cache sized from the device")
    assert sized.fields["graphs"] > 0 and sized.fields["kv_bytes"] > 0
    assert sorted(core.runner.graphs.graphs) == core.runner.graphs.sizes
    assert tokens == run(cuda_llama, attention_backend="sdpa")[1]


def test_async_scheduling_with_a_lagging_device_gives_the_same_tokens(cuda_llama):
    """The device runs ~1 ms behind the host at every launch, so steps really are in flight while the
    host schedules and packs the next one."""
    _, expected = run(cuda_llama, attention_backend="auto")
    core = make_core(cuda_llama, num_blocks=96, max_batched_tokens=96, max_num_seqs=12, async_scheduling=True)
    launch = core.runner.run

    def lagging(chunks, pending=None):
        torch.cuda._sleep(2_000_000)  # clock cycles of a kernel that only waits
        return launch(chunks, pending)

    core.runner.run = lagging
    assert run_core(core, workload(cuda_llama)) == expected


def never_waiting(function):
    """`function` made to raise where it synchronizes with the device (CUDA's sync debug mode)."""

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return function(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return strict


def test_an_arriving_adapter_reaches_the_device_without_waiting_for_it(cuda_llama):
    """The engine process's receiver and the registry place adapters while steps run: their copies must not
    wait for the device's queued work, and must give the bits a cast on the host gives."""
    adapter_file = random_adapter_file("loreft", (1, 2), 4, "f3+l3", cuda_llama.config.hidden_size, seed=0)
    on_host = materialize(adapter_file, name="a", dtype=torch.bfloat16)
    on_device = never_waiting(materialize)(adapter_file, name="a", dtype=torch.bfloat16, device="cuda")
    for layer, interventions in on_host.layers.items():
        for host, device in zip(interventions, on_device.layers[layer], strict=True):
            for name, tensor in host.params.items():
                assert device.params[name].is_cuda and torch.equal(device.params[name].cpu(), tensor)


def test_async_decode_launches_never_wait_for_the_device(cuda_llama):
    """A decode step's launch (inputs, graph replay, draw with filters, bias, penalties and min_tokens' held
    stops, the copy home) must not synchronize with the device, or its host work cannot overlap the step
    before: CUDA's sync debug mode raises on any."""
    from tests.engine_utils import prompt

    core = make_core(cuda_llama, num_blocks=96, max_batched_tokens=96, max_num_seqs=12, async_scheduling=True)
    filters = {"top_k": 50, "top_p": 0.9, "logit_bias": ((7, 5.0),), "min_tokens": 30, "stop_token_ids": (9,)}
    penalties = {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.3}
    for i in range(8):  # every sampling feature, the penalties' device-side counts included
        sampling = {"temperature": 0.8, "seed": i, "logprobs": 2} | (filters | penalties if i % 2 else {})
        core.add(seq(f"s{i}", prompt(20 + 3 * i, i), max_new_tokens=40, **sampling))
    while any(s.num_computed < s.num_prompt for s in core.sequences.values()):
        core.step()
    core.step()
    core._launch = never_waiting(core._launch)
    replayed = core.runner.graphs.steps_run
    for _ in range(20):  # new KV blocks every 16 tokens: their zeroing is in there too
        core.step()
    assert core.runner.graphs.steps_run == replayed + 20


def test_launches_with_rows_held_to_a_grammar_never_wait_for_the_device(cuda_llama, tiny_model_dir):
    """A step whose rows are partly held to a grammar (its masks cross in one copy, onto a subset of rows):
    its launch must not synchronize, or the draw's host work cannot overlap the forward."""
    import llguidance
    from transformers import AutoTokenizer

    from server.engine.grammar import Grammars
    from tests.engine_utils import prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    grammars = Grammars(tokenizer, cuda_llama.config.vocab_size, {2})
    core = make_core(cuda_llama, eos={2}, grammars=grammars, num_blocks=96, max_num_seqs=12, async_scheduling=True)
    regex = llguidance.LLMatcher.grammar_from_regex("[a-z ]{8,60}")
    for i in range(6):
        sampling = {"temperature": 0.8, "seed": i} if i % 3 else {}
        core.add(seq(f"s{i}", prompt(12 + i, i), max_new_tokens=40, grammar=regex if i % 2 else None, **sampling))
    while core.load().waiting:  # the grammar compiles off the engine's thread; then a step's lazy set-up
        core.step()
    core.step()
    core._launch = never_waiting(core._launch)
    for _ in range(10):
        core.step()


@pytest.mark.parametrize("compile_backend", [None, "inductor"])
def test_async_prefill_launches_never_wait_for_the_device(cuda_llama, compile_backend):
    """Steps that prefill run eagerly (HF's forward, ReFT's hooks editing rows of several adapters, the
    compiled layers with --compile): their launches must not synchronize either, or every prompt costs
    the overlap. The first step runs unchecked: lazy set-up on first use may wait once."""
    from tests.engine_utils import prompt

    config = {"async_scheduling": True, "compile_backend": compile_backend}
    core = make_core(cuda_llama, num_blocks=96, max_batched_tokens=48, max_num_seqs=12, **config)
    hidden = cuda_llama.config.hidden_size
    for i in range(6):
        adapter_file = random_adapter_file("loreft", (1, 2), 4, "f3+l3", hidden, seed=i)
        adapter = materialize(adapter_file, name=f"a{i}", device="cuda") if i % 3 else None
        core.add(seq(f"s{i}", prompt(30 + 7 * i, i), adapter, max_new_tokens=4))
    core.step()
    launch = core._launch
    prefill_launches = []

    def recorded(chunks, previous):
        prefill_launches.append(any(chunk.length > 1 for chunk in chunks))
        return launch(chunks, previous)

    core._launch = never_waiting(recorded)
    while core.has_work():
        core.step()
    assert sum(prefill_launches) >= 3
