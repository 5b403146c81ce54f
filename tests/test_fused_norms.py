"""The engine's fused RMSNorm (server/engine/fused_norms.py) computes exactly what transformers' norm does,
and leaves alone the norms that compute something else."""

import pytest
import torch
from torch import nn

from server.config import Settings
from server.engine.attention import ATTENTION_NAME
from server.engine.fused_norms import fuse_rms_norms
from server.models.loader import load_causal_lm
from server.models.tiny import VOCAB_SIZE, tiny_config
from server.reft.reference import reference_generate
from tests.engine_utils import make_core, run_core, seq


def random_model(family: str, dtype: torch.dtype, num_layers: int = 2, attention: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    model = load_causal_lm(tiny_config(family, num_layers=num_layers), dtype, attention=attention)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "variance_epsilon"):
                module.weight.normal_(1.0, 0.5)  # ones (the init) would hide a scale applied in the wrong place
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("family", "norms_per_layer"), [("llama", 2), ("qwen2", 2), ("mistral", 2), ("qwen3", 4)])
def test_fused_norms_give_the_models_own_logits(family, norms_per_layer, dtype):
    model = random_model(family, dtype)
    ids = torch.randint(3, VOCAB_SIZE, (2, 17))
    with torch.inference_mode():
        expected = model(ids).logits
        assert fuse_rms_norms(model) == 2 * norms_per_layer + 1  # and the final norm
        assert torch.equal(model(ids).logits, expected)
        forwards = [vars(module).get("forward") for module in model.modules()]
        assert fuse_rms_norms(model) == 2 * norms_per_layer + 1  # a second engine on the same model
        now = [vars(module).get("forward") for module in model.modules()]
        assert all(a is b for a, b in zip(now, forwards, strict=True))  # the same method objects
        assert torch.equal(model(ids).logits, expected)


def test_norms_that_compute_something_else_keep_their_forward():
    class OnePlusWeight(nn.Module):  # Gemma's: scales by 1 + weight, its weight starts at zeros
        def __init__(self, size: int):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(size))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    class ScaleThenRound(nn.Module):  # one rounding, after the scale (ones at init: the same as Llama's there)
        def __init__(self, size: int):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(size, dtype=torch.bfloat16))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (self.weight.float() * normed).to(x.dtype)

    class Gated(nn.Module):  # another signature
        def __init__(self, size: int):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(size))
            self.variance_epsilon = 1e-6

        def forward(self, x, gate):
            return self.weight * x * gate

    modules = nn.ModuleList([OnePlusWeight(16), ScaleThenRound(64), Gated(16), nn.LayerNorm(16)])
    assert fuse_rms_norms(modules) == 0
    assert all("forward" not in vars(module) for module in modules)
    assert fuse_rms_norms(random_model("gpt2", torch.float32)) == 0


def test_the_fused_kernels_switch_keeps_the_models_own_norms_and_the_same_tokens():
    """`--no-fused-kernels` (EngineConfig.fused_kernels): an engine that leaves the norms' forward as it is, and
    serves the tokens an engine with them fused serves, and the reference."""
    plain, fused = (random_model("llama", torch.float32, attention=ATTENTION_NAME) for _ in range(2))
    assert Settings(fused_kernels=False).engine_config("cpu").fused_kernels is False
    prompt = [5, 9, 14, 3, 7]
    tokens = {}
    for name, model, switch in (("plain", plain, False), ("fused", fused, True)):
        core = make_core(model, fused_kernels=switch)
        tokens[name] = run_core(core, [(seq("r", prompt, max_new_tokens=8), 0)])["r"]
    assert not any("forward" in vars(module) for module in plain.modules())
    assert sum("forward" in vars(module) for module in fused.modules()) == 2 * 2 + 1
    reference = reference_generate(random_model("llama", torch.float32), prompt, None, max_new_tokens=8)
    assert tokens["plain"] == tokens["fused"] == reference
