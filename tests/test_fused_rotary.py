"""The fused rotary embedding (server/engine/fused_rotary.py): which models' rotations it takes over, that they
keep their own function everywhere but CUDA, and its Triton kernel against Llama's rotation, bit for bit, under
Triton's interpreter on the CPU (tests/triton_interpreter.py). The CUDA test (test_gpu_engine.py) holds the
compiled kernel to transformers' own function in bfloat16 too."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.fused_norms import same_bits
from server.engine.fused_rotary import (
    FusedRotary,
    _computes_llama_rotation,
    fuse_rotary,
    llama_rotation,
    transformers_own_rotation,
)
from server.models.tiny import VOCAB_SIZE, tiny_config
from tests.triton_interpreter import interpreted_cases


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
def test_llama_family_rotations_are_taken_over_and_give_the_same_logits_off_cuda(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers=2)).eval()
    module = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    ids = torch.randint(3, VOCAB_SIZE, (2, 9))
    with torch.inference_mode():
        original = getattr(module.apply_rotary_pos_emb, "original", module.apply_rotary_pos_emb)
        module.apply_rotary_pos_emb = original
        expected = model(ids).logits
        assert fuse_rotary(model) == 1
        fused = module.apply_rotary_pos_emb
        assert isinstance(fused, FusedRotary) and fused.original is original
        assert fuse_rotary(model) == 1 and module.apply_rotary_pos_emb is fused  # a second engine: the same
        assert torch.equal(model(ids).logits, expected)  # on the CPU the original runs


def test_other_rotations_keep_their_function():
    def interleaved(q, k, cos, sin):  # GPT-J's pairs (x0, x1), (x2, x3), ...: not Llama's halves
        def rotate(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    def scaled_once(q, k, cos, sin):  # Llama's formula, rounded once at the end
        out = llama_rotation(q.float(), k.float(), cos.float(), sin.float())
        return out[0].to(q.dtype), out[1].to(k.dtype)

    assert _computes_llama_rotation(lambda q, k, cos, sin: llama_rotation(q, k, cos, sin))
    assert not _computes_llama_rotation(interleaved)
    assert not _computes_llama_rotation(scaled_once)
    assert not _computes_llama_rotation(lambda q, k, cos, sin, position_ids: (q, k))  # another signature
    assert fuse_rotary(AutoModelForCausalLM.from_config(tiny_config("gpt2", num_layers=1))) == 0  # no rotation


CASES = [  # dtype, batch, heads, kv heads, tokens, head dim
    ("float32", 1, 4, 2, 5, 16),
    ("float32", 2, 6, 3, 7, 12),  # heads and a half dimension that are not powers of two
    ("float16", 1, 8, 2, 4, 16),
    ("float16", 2, 3, 3, 1, 64),  # a decode step's single token, no grouping
]

CHILD = """
import json, sys
import torch
from server.engine.fused_norms import same_bits
from server.engine.fused_rotary import llama_rotation
from server.engine.fused_rotary_triton import rotary_call

torch.manual_seed(0)
results = []
for dtype, batch, heads, kv_heads, tokens, head_dim in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    # HF's layouts: the projections' [batch, tokens, heads, D] seen as [batch, heads, tokens, D]; zeros of
    # both signs, and angles of 0 (sin 0), where only the sum's sign rules tell -0 from 0
    q, k = (4 * torch.randn(batch, tokens, n, head_dim) for n in (heads, kv_heads))
    for x in (q, k):
        x.view(-1)[::5], x.view(-1)[1::7] = 0.0, -0.0
    q, k = (x.to(dtype).transpose(1, 2) for x in (q, k))
    angles = torch.rand(batch, tokens, head_dim // 2) * 10
    angles.view(-1)[::3] = 0.0
    cos, sin = (torch.cat((f(angles), f(angles)), dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    rotary_call(q, k, cos, sin, q_out, k_out).launch()
    q_twin, k_twin = llama_rotation(q, k, cos, sin)
    results.append([same_bits(q_out, q_twin), same_bits(k_out, k_twin), q_out.stride() == q.stride()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    return interpreted_cases(CHILD, CASES)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_kernel_gives_llamas_bits(results, case):
    assert results[case] == [True, True, True], CASES[case]


def test_a_kernel_that_fails_leaves_the_models_own_rotation_for_good(monkeypatch, caplog):
    """Here the launch fails for real (Triton takes no CPU tensors outside its interpreter)."""
    import server.engine.fused_rotary as fused_rotary

    monkeypatch.setattr(fused_rotary, "_kernel_takes", lambda *tensors: True)
    rotary = FusedRotary(llama_rotation)
    q, k = torch.randn(1, 5, 4, 8).transpose(1, 2), torch.randn(1, 5, 2, 8).transpose(1, 2)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    for _ in range(2):
        assert all(map(same_bits, rotary(q, k, cos, sin), llama_rotation(q, k, cos, sin)))
    assert rotary.failed and caplog.text.count("the fused rotary kernel failed") == 1


def test_baselines_get_transformers_own_rotation_back():
    import transformers.models.llama.modeling_llama as llama

    fuse_rotary(AutoModelForCausalLM.from_config(tiny_config("llama", num_layers=1)))
    fused = llama.apply_rotary_pos_emb
    with transformers_own_rotation():
        assert llama.apply_rotary_pos_emb is fused.original
    assert llama.apply_rotary_pos_emb is fused
