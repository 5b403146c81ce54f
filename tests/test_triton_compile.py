"""The Triton kernels compiled ahead of time for the GPUs that serve, on any machine.

The interpreter tests (test_paged_decode.py, test_paged_prefill.py) check what the kernels compute, but
the interpreter runs their bodies as Python: code that Triton's compiler refuses, or a launch whose
constants it cannot lay out (a tl.dot side under 16, a range that is not a power of two), passes there
and fails on the first GPU. Here Triton's own compiler takes the launches the engine makes
(`decode_call`, `prefill_call`, built from CPU tensors of the served shapes) down to a cubin for sm_90
(H100, H200) and, at the 1b preset's shape, for sm_80 (A100), sm_89 (L4, L40S), sm_75 (T4) and sm_100
(B200). No GPU is needed: Triton ships ptxas.
"""

import itertools

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from server.engine.paged_decode_triton import decode_call  # noqa: E402
from server.engine.paged_prefill import QUERY_TILE, prefill_tiles  # noqa: E402
from server.engine.paged_prefill_triton import prefill_call  # noqa: E402
from server.engine.paged_triton import KernelCall  # noqa: E402

SHAPES = {  # name -> (dtype, heads, KV heads, head dim)
    "llama-3.2-1b": (torch.bfloat16, 32, 8, 64),  # bench/gpu.py's 1b preset
    "smollm2-135m": (torch.bfloat16, 9, 3, 64),  # the demo: groups of 3
    "qwen2-0.5b": (torch.bfloat16, 14, 2, 64),  # groups of 7
    "mha-128": (torch.float16, 16, 16, 128),  # no grouping, wide heads
    "tests-float32": (torch.float32, 4, 2, 16),  # the tests' tiny models
}
TARGETS = {"sm_90": 90, "sm_80": 80, "sm_89": 89, "sm_75": 75, "sm_100": 100}  # H100/H200, A100, L4/L40S, T4, B200
CASES = [(shape, target) for shape in SHAPES for target in TARGETS if target == "sm_90" or shape == "llama-3.2-1b"]
POINTER_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64"}


def kernel_calls(dtype, heads, kv_heads, head_dim) -> dict[str, KernelCall]:
    """The engine's two launches for a step of 4 decode rows and 2 prefill chunks, block size 16."""
    block_size, scale = 16, head_dim**-0.5
    keys = torch.zeros(64 * block_size, kv_heads, head_dim, dtype=dtype)
    values = torch.zeros_like(keys)
    queries = torch.zeros(heads, 40, head_dim, dtype=dtype).transpose(0, 1)  # HF's [T, H, D] view
    out = torch.empty(40, heads, head_dim, dtype=dtype)
    tables = torch.zeros(4, 8, dtype=torch.long)
    decode = decode_call(out, queries, keys, values, tables, torch.ones(4, dtype=torch.long), block_size, scale)
    tiles = torch.from_numpy(prefill_tiles([(4, 20, 0), (24, 16, 30)]))
    prefill = prefill_call(out, queries, keys, values, tables[:2], tiles, QUERY_TILE, block_size, scale, 100)
    return {"decode": decode, "prefill": prefill}


def compile_ahead(call: KernelCall, capability: int):
    """Triton's compiler on the call, specialized as a launch on that GPU would be: pointers aligned to 16
    bytes, and integers that may vary (do_not_specialize) apart, the others' divisibility by 16 known."""
    names = call.kernel.arg_names
    varying = set(call.kernel.do_not_specialize)  # names or indices, by Triton version
    varying |= {names[i] for i in varying if isinstance(i, int)}
    signature, attrs = {}, {}
    for index, value in enumerate(call.args):  # the runtime arguments come first, in order
        name = names[index]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTER_TYPES[value.dtype]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
        if isinstance(value, torch.Tensor) or (isinstance(value, int) and name not in varying and value % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    constexprs = {}
    for name, value in call.constexprs.items():
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    assert list(signature) == list(names), "every argument of the kernel is given"
    source = ASTSource(call.kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=call.options)


@pytest.mark.parametrize("shape, target", CASES)
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_the_engines_launches_compile_for_the_gpus_that_serve(shape, target, kernel):
    call = kernel_calls(*SHAPES[shape])[kernel]
    compiled = compile_ahead(call, TARGETS[target])
    assert compiled.asm["cubin"], "no machine code"
    assert f".target {target}" in compiled.asm["ptx"]


def sweep_calls() -> list[tuple[str, KernelCall]]:
    """Every launch that bench/gpu.py's `kernel` part sweeps, at the 1b preset's shape."""
    from bench.decode_kernel_launches import GRID as DECODE_GRID
    from bench.prefill_kernel import GRID as PREFILL_GRID
    from server.engine.paged_decode_triton import Launch
    from server.engine.paged_prefill_triton import PrefillLaunch

    out, queries, keys, values, tables = kernel_calls(*SHAPES["llama-3.2-1b"])["decode"].args[:5]
    context, made = torch.ones(4, dtype=torch.long), []
    for tile, num_warps, num_stages in itertools.product(*DECODE_GRID.values()):
        launch = Launch(tile, num_warps, num_stages)
        call = decode_call(out, queries, keys, values, tables, context, 16, 0.125, launch=launch)
        made.append((f"decode {launch}", call))
    for query_tile, key_tile, num_warps in itertools.product(*PREFILL_GRID.values()):
        launch = PrefillLaunch(key_tile, num_warps)
        tiles = torch.from_numpy(prefill_tiles([(4, 20, 0), (24, 16, 30)], query_tile))
        call = prefill_call(out, queries, keys, values, tables[:2], tiles, query_tile, 16, 0.125, launch=launch)
        made.append((f"prefill query_tile={query_tile} {launch}", call))
    return made


def test_every_launch_the_kernel_bench_sweeps_compiles_for_sm_90():
    """A GPU session's minutes go to timing the sweeps, not to finding launches the compiler refuses."""
    refused = []
    for name, call in sweep_calls():
        try:
            assert compile_ahead(call, TARGETS["sm_90"]).asm["cubin"]
        except Exception as e:
            refused.append(f"{name}: {type(e).__name__}: {e}"[:300])
    assert not refused, "\n".join(refused)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_rotary_kernel_compiles_for_sm_90(shape):
    """fused_rotary_triton.py's launch for a step of 40 tokens in HF's layouts, fused multiply-adds off."""
    from server.engine.fused_rotary_triton import rotary_call

    dtype, heads, kv_heads, head_dim = SHAPES[shape]
    q = torch.zeros(1, 40, heads, head_dim, dtype=dtype).transpose(1, 2)
    k = torch.zeros(1, 40, kv_heads, head_dim, dtype=dtype).transpose(1, 2)
    cos = torch.zeros(1, 40, head_dim, dtype=dtype)
    call = rotary_call(q, k, cos, cos, torch.empty_like(q), torch.empty_like(k))
    compiled = compile_ahead(call, TARGETS["sm_90"])
    assert compiled.asm["cubin"], "no machine code"
    assert "fma." not in compiled.asm["ptx"]  # a product fused into the sum would skip its rounding


@pytest.mark.parametrize(
    "dtype, hidden, rank",
    [(torch.bfloat16, 2048, 4), (torch.bfloat16, 576, 4), (torch.float16, 4096, 8), (torch.float32, 32, 1)],
)
@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
def test_the_loreft_kernel_compiles_for_the_gpus_that_serve(dtype, hidden, rank, target):
    """fused_loreft_triton.py's launch for 3 segments of 5 rows at layer position 1 of 2: the 1b preset's and
    SmolLM2's widths, a wide fp16 model, the tests' float32 one with rank 1."""
    from server.reft.fused_loreft_triton import loreft_launch

    params = {
        "rotation": torch.zeros(2, 3, hidden, rank),
        "weight": torch.zeros(2, 3, rank, hidden, dtype=dtype),
        "bias": torch.zeros(2, 3, 1, rank, dtype=dtype),
    }
    rows = torch.zeros(14, dtype=torch.long)
    kernel, grid, args, constexprs, options = loreft_launch(
        torch.zeros(40, hidden, dtype=dtype), rows, rows, 5, params, 1
    )
    compiled = compile_ahead(KernelCall(kernel, grid, args, constexprs, options), TARGETS[target])
    assert compiled.asm["cubin"], "no machine code"
