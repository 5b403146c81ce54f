"""The paged decode kernel (Triton, CUDA) against its torch twin, run by Triton's interpreter on the CPU.

The twin itself is held to the sdpa backend by test_attention_backends.py; here the kernel must match
the twin on GQA and MHA, head counts, head sizes and block sizes that are not powers of two, sliding
windows, contexts that end mid-block, block tables seen through a transposed view (as the CUDA-graph
buffers hand them over), queries with HF's strides, and tiles of positions other than the default.
The comparison runs in a child process under the interpreter (tests/triton_interpreter.py).
"""

import pytest

from tests.triton_interpreter import interpreted_cases

pytest.importorskip("triton")

CASES = [  # dtype, heads, kv heads, head dim, block size, sliding window, positions per iteration
    ("float32", 8, 2, 16, 4, None, 64),
    ("float32", 4, 4, 8, 16, None, 64),
    ("float32", 6, 2, 12, 3, 5, 64),
    ("bfloat16", 8, 2, 16, 4, None, 64),
    ("bfloat16", 6, 3, 20, 5, 7, 64),
    ("float32", 8, 2, 16, 4, 9, 16),
    ("bfloat16", 8, 2, 16, 16, None, 128),
]

CHILD = """
import json, sys
import torch
from server.engine.paged_decode import paged_decode_reference
from server.engine.paged_decode_triton import Launch, paged_decode_triton

torch.manual_seed(0)
errors = []
for dtype, heads, kv_heads, head_dim, block_size, window, tile in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    num_blocks, width = 24, 8
    keys = torch.randn(num_blocks * block_size, kv_heads, head_dim).to(dtype)
    values = torch.randn_like(keys)
    context = torch.tensor([1, block_size, block_size + 1, 3 * block_size - 1, width * block_size])
    rows = len(context)
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in range(rows)])
    tables = tables.T.contiguous().T  # column-major, like the CUDA-graph buffers
    queries = torch.randn(heads, rows, head_dim).to(dtype).transpose(0, 1)  # HF's [T, H, D] view
    args = (queries, keys, values, tables, context, block_size, 0.25, window)
    kernel = paged_decode_triton(torch.empty_like(queries), *args, launch=Launch(tile=tile, num_warps=2, num_stages=2))
    twin = paged_decode_reference(torch.empty_like(queries), *args)
    errors.append((kernel.float() - twin.float()).abs().max().item())
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def errors():
    return interpreted_cases(CHILD, CASES)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_its_torch_twin(errors, case):
    dtype = CASES[case][0]
    assert errors[case] <= (1e-5 if dtype == "float32" else 1.6e-2), CASES[case]
