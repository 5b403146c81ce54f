"""The paged prefill kernel (Triton, CUDA) against its torch twin, run by Triton's interpreter on the CPU,
and the twin against the decode twin, token by token.

Query token i of a chunk from position `start` is, for attention, a decode row with context start + i + 1
over its sequence's block table; the twins themselves are held to the sdpa backend by
test_attention_backends.py. Cases cover GQA with groups that are not powers of two and MHA, head sizes
and block sizes that are not powers of two, sliding windows, chunks after cached tokens, lengths that
end mid-tile, tables seen through a transposed view, HF's query strides, other tiles, and rows outside
the chunks, which must stay as they were. Then a whole engine runs both Triton kernels, interpreted.
"""

import pytest

from tests.triton_interpreter import interpreted, interpreted_cases

pytest.importorskip("triton")

# 16-bit pools take the kernel's 16-bit products as float16: the interpreter multiplies bfloat16 operands'
# raw bits (triton-lang/triton#11584; tests/test_gpu_engine.py checks bfloat16 on a GPU)
CASES = [  # dtype, heads, kv heads, head dim, block size, sliding window, query tile, key tile
    ("float32", 8, 2, 16, 4, None, 16, 64),
    ("float32", 4, 4, 8, 16, None, 16, 16),
    ("float32", 6, 2, 12, 3, 5, 16, 64),
    ("float16", 8, 2, 16, 4, None, 16, 64),
    ("float16", 9, 3, 20, 5, 7, 8, 16),
    ("float32", 8, 8, 16, 4, 9, 4, 32),
    ("float32", 8, 2, 16, 16, None, 64, 128),  # the largest tiles bench/gpu.py's `kernel` part sweeps
]

CHILD = """
import json, sys
import torch
from server.engine.paged_decode import paged_decode_reference
from server.engine.paged_prefill import paged_prefill_reference, prefill_tiles
from server.engine.paged_prefill_triton import PrefillLaunch, paged_prefill_triton

torch.manual_seed(0)
errors = []
for dtype, heads, kv_heads, head_dim, block_size, window, query_tile, key_tile in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    num_blocks, width = 40, 20
    keys = torch.randn(num_blocks * block_size, kv_heads, head_dim).to(dtype)
    values = torch.randn_like(keys)
    # row, length, start
    chunks = [(2, 2, 0), (4, 17, 0), (21, 9, 2 * block_size + 1), (30, 1, 3), (31, 33, 5 * block_size)]
    rows = 64 + 3
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in chunks])
    tables = tables.T.contiguous().T  # column-major
    queries = torch.randn(heads, rows, head_dim).to(dtype).transpose(0, 1)  # HF's [T, H, D] view
    launch = PrefillLaunch(key_tile=key_tile, num_warps=2, num_stages=1)
    tiles = torch.from_numpy(prefill_tiles(chunks, query_tile))
    args = (queries, keys, values, tables, tiles, query_tile, block_size, 0.25, window)
    out = paged_prefill_triton(torch.full_like(queries, 7.0), *args, launch=launch)
    twin = paged_prefill_reference(torch.full_like(queries, 7.0), *args)
    token_rows = [row + i for row, length, _ in chunks for i in range(length)]
    token_tables = torch.stack([tables[c] for c, (_, length, _) in enumerate(chunks) for _ in range(length)])
    context = torch.tensor([start + i + 1 for _, length, start in chunks for i in range(length)])
    decode = paged_decode_reference(
        torch.empty_like(queries[token_rows]), queries[token_rows], keys, values, token_tables, context, block_size,
        0.25, window,
    )
    others = sorted(set(range(rows)) - set(token_rows))
    untouched = bool((out[others] == 7.0).all() and (twin[others] == 7.0).all())
    kernel_error = (out[token_rows].float() - twin[token_rows].float()).abs().max().item()
    errors.append([kernel_error, untouched, bool(torch.equal(twin[token_rows], decode))])
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def results():
    return interpreted_cases(CHILD, CASES)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_its_twin_token_by_token(results, case):
    error, untouched, twins_agree = results[case]
    assert error <= (1e-5 if CASES[case][0] == "float32" else 1.6e-2), CASES[case]
    assert untouched, "rows outside the chunks were written"
    assert twins_agree, "the prefill twin must be the decode twin, token by token"


def test_tiles_cut_each_chunk_in_order():
    from server.engine.paged_prefill import prefill_tiles

    tiles = prefill_tiles([(3, 5, 0), (8, 2, 10)], 4)
    assert tiles.tolist() == [[3, 4, 0, 0], [7, 1, 4, 0], [8, 2, 10, 1]]
    assert prefill_tiles([], 4).shape == (0, 4)


ENGINE_CHILD = """
import random, sys
import torch
from server.engine import attention
from server.engine.paged_decode_triton import paged_decode_triton
from server.engine.paged_prefill_triton import paged_prefill_triton
from tests.engine_utils import load_engine_model, prompt, random_adapter
from tests.test_attention_backends import run_backend

attention.decode_kernel = lambda device_type: paged_decode_triton
attention.prefill_kernel = lambda device_type: paged_prefill_triton
model = load_engine_model(sys.argv[1])
hidden = model.config.hidden_size
adapters = [random_adapter(f"a{i}", "loreft", (1, 2), 4, "f2+l3", hidden, seed=i) for i in range(2)]
shared = prompt(21, 99)
rng = random.Random(0)
choices = [None, adapters[0], adapters[1], adapters[0]]  # the odd ones share a prefix and an adapter
requests = [
    (f"r{i}", (shared if i % 2 else []) + prompt(rng.randint(2, 30), i)[bool(i % 2):], choices[i % 4], i, 5)
    for i in range(7)
]
config = dict(max_batched_tokens=24, max_num_seqs=4, cuda_graphs=False)
_, expected, expected_logits = run_backend(model, "sdpa", requests, **config)
core, tokens, logits = run_backend(model, "paged", requests, **config)
assert core.kv.prefix_hits > 0, "no chunk started after cached tokens"
assert tokens == expected, (tokens, expected)
for reference, got in zip(expected_logits, logits, strict=True):
    if got is not None:
        torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-5)
print("agree", sum(len(t) for t in tokens.values()))
"""


def test_the_engine_with_both_triton_kernels_gives_sdpa_tokens(tiny_model_dir):
    """The paged backend as CUDA runs it (both kernels, each step's tiles and tables, HF's query views),
    interpreted on the CPU: chunked prefills after cached prefixes, adapters, decode rows in the same steps."""
    assert interpreted(ENGINE_CHILD, str(tiny_model_dir("llama")), timeout=600) == "agree 35"
