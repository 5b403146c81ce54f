"""The fused LoReFT kernel edits a batch's rows as the torch formula does, in place, and nothing else.

What it computes is checked under Triton's interpreter on the CPU (tests/triton_interpreter.py); that it
compiles for the GPUs that serve, in test_triton_compile.py; on a GPU, in test_gpu_engine.py. The float32
sums run in another order than cuBLAS's, so the last bit may differ: float32 is held to 1e-5, 16-bit types
to a rounding step.
"""

import logging

import pytest
import torch

from server.reft import fused_loreft
from server.reft.interventions import activation
from tests.triton_interpreter import interpreted_cases

CASES = [  # dtype, hidden size, rank, segments, segment length, layers, layer position
    ("float32", 32, 4, 3, 5, 2, 1),
    ("bfloat16", 48, 3, 2, 7, 1, 0),  # a hidden size and a rank that are not powers of two
    ("float16", 2100, 8, 4, 3, 3, 2),  # wider than one tile of the hidden size, with a remainder
    ("bfloat16", 64, 1, 5, 1, 2, 0),  # rank 1, one row per segment
]

CHILD = """
import json, sys
import torch
from server.reft.fused_loreft_triton import loreft_launch
from server.reft.interventions import activation, loreft, stack_params

torch.manual_seed(0)
results = []
for dtype, d, r, segments, length, layers, layer_index in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    params = [
        {"rotation": torch.linalg.qr(torch.randn(d, r))[0], "weight": (torch.randn(r, d) / d**0.5).to(dtype),
         "bias": torch.randn(r).to(dtype)}
        for _ in range(layers * segments)
    ]
    stacked = {n: t.view(layers, segments, *t.shape[1:]) for n, t in stack_params(params).items()}
    steps_rows = segments * length + 9
    hidden = (3 * torch.randn(steps_rows, d)).to(dtype)
    order = torch.randperm(steps_rows)[: segments * length - 1]  # the last segment one row short
    positions = torch.arange(segments * length - 1)
    before = hidden.clone()
    kernel, grid, args, constexprs, options = loreft_launch(hidden, order, positions, length, stacked, layer_index)
    kernel[grid](*args, **constexprs, **options)
    expected = before.clone()
    for s in range(segments):
        rows = order[s * length : (s + 1) * length]
        expected[rows] = loreft(before[rows], params[layer_index * segments + s], activation("linear"))
    untouched = torch.ones(steps_rows, dtype=torch.bool)
    untouched[order] = False
    error = (hidden.float() - expected.float()).abs().max().item()
    ulp = torch.finfo(dtype).eps * expected.float().abs().max().item()
    results.append([error, ulp, torch.equal(hidden[untouched], before[untouched])])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    return interpreted_cases(CHILD, CASES)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_kernel_edits_rows_as_the_torch_formula_does(results, case):
    error, ulp, untouched_kept = results[case]
    assert untouched_kept, "rows outside the batch changed"
    assert error <= (1e-5 if CASES[case][0] == "float32" else ulp), CASES[case]


def test_off_cuda_the_torch_formula_edits_and_nothing_is_stacked_for_the_kernel():
    def stacked():
        raise AssertionError("the parameters were stacked for a kernel that cannot run here")

    rows = torch.tensor([0])
    assert not fused_loreft.loreft_in_place(torch.zeros(2, 8), rows, rows, 1, stacked, 0, activation("linear"))


def test_a_kernel_that_fails_leaves_the_torch_formula_for_good(monkeypatch, caplog):
    """Here the launch fails for real (Triton takes no CPU tensors outside its interpreter)."""
    pytest.importorskip("triton")
    monkeypatch.setattr(fused_loreft, "_kernel_runs", lambda *args: True)
    monkeypatch.setattr(fused_loreft, "_kernel_takes", lambda *args: True)
    monkeypatch.setattr(fused_loreft, "_failed", False)
    d, r = 8, 2
    params = {"rotation": torch.zeros(1, 1, d, r), "weight": torch.zeros(1, 1, r, d), "bias": torch.zeros(1, 1, 1, r)}
    rows = torch.tensor([0])
    with caplog.at_level(logging.ERROR):
        for _ in range(2):
            stacked = lambda: params  # noqa: E731
            assert not fused_loreft.loreft_in_place(torch.zeros(2, d), rows, rows, 1, stacked, 0, activation("linear"))
    assert fused_loreft._failed and caplog.text.count("the fused LoReFT kernel failed") == 1
