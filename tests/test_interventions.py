"""Each ReFT formula against a direct float64 computation, and pyreft's dtype behaviour."""

import pytest
import torch

from server.reft.interventions import INTERVENTION_TYPES, Intervention, activation, cast_params, intervention_type

D, R, N = 32, 4, 5


def random_params(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(D, R, generator=g))
    params = {
        "rotation": rotation,
        "weight": torch.randn(R, D, generator=g),
        "bias": torch.randn(R, generator=g),
        "proj_weight": torch.randn(R, D, generator=g),
        "proj_bias": torch.randn(R, generator=g),
    }
    names = {spec.name for spec in intervention_type(kind).params}
    return {name: t for name, t in params.items() if name in names}


def direct(kind: str, h: torch.Tensor, p: dict, act) -> torch.Tensor:
    """The paper's formulas, written with R = R'^T, in float64."""
    h = h.double()
    p = {k: v.double() for k, v in p.items()}
    if kind in ("loreft", "direft", "consreft", "lobireft"):
        rt = p["rotation"]  # R^T, d x r
        r = rt.T
    if kind == "loreft":
        return h + (act(h @ p["weight"].T + p["bias"]) - h @ r.T) @ r
    if kind == "direft":
        return h + act(h @ p["weight"].T + p["bias"]) @ r
    if kind == "consreft":
        return h + (p["bias"] - h @ r.T) @ r
    if kind == "lobireft":
        return h + p["bias"] @ r
    if kind == "noreft":
        w2 = p["proj_weight"]
        return h + (act(h @ p["weight"].T + p["bias"]) - (h @ w2.T + p["proj_bias"])) @ w2
    if kind == "nodireft":
        return h + act(h @ p["weight"].T + p["bias"]) @ p["proj_weight"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", sorted(INTERVENTION_TYPES))
@pytest.mark.parametrize("act_name", ["linear", "relu", "gelu"])
def test_formula_matches_direct_computation(kind, act_name):
    act = activation(act_name)
    params = random_params(kind)
    h = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    got = Intervention(INTERVENTION_TYPES[kind], act, params)(h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), direct(kind, h, params, act), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(INTERVENTION_TYPES))
def test_bf16_model_keeps_rotation_in_fp32_and_returns_bf16(kind):
    spec = intervention_type(kind)
    params = cast_params(spec, random_params(kind), torch.bfloat16, "cpu")
    for name, tensor in params.items():
        assert tensor.dtype == (torch.float32 if spec.param(name).fp32 else torch.bfloat16), name
    h = torch.randn(N, D, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    got = Intervention(spec, activation("linear"), params)(h)
    assert got.dtype == torch.bfloat16
    expected = direct(kind, h.float(), {k: v.float() for k, v in params.items()}, activation("linear"))
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=0.15)  # bf16 steps on values ~10


def test_loreft_sums_in_fp32_before_casting_back():
    """pyreft: output = (h + fp32 delta).to(h.dtype), not h + delta.to(h.dtype)."""
    spec = intervention_type("loreft")
    params = cast_params(spec, random_params("loreft"), torch.bfloat16, "cpu")
    h = (torch.randn(64, D) * 50).to(torch.bfloat16)
    rotation = params["rotation"]
    delta = (torch.nn.functional.linear(h, params["weight"], params["bias"]) - h.float() @ rotation) @ rotation.T
    expected = (h + delta).to(torch.bfloat16)
    assert torch.equal(Intervention(spec, activation("linear"), params)(h), expected)


def test_loreft_is_identity_when_source_equals_projection():
    params = random_params("loreft")
    params["weight"] = params["rotation"].T.clone()
    params["bias"] = torch.zeros(R)
    h = torch.randn(N, D)
    torch.testing.assert_close(Intervention(INTERVENTION_TYPES["loreft"], activation("linear"), params)(h), h)


def test_unknown_type_and_activation_are_named():
    with pytest.raises(ValueError, match="unknown intervention type 'bogus'"):
        intervention_type("bogus")
    with pytest.raises(ValueError, match="unknown activation 'nope'"):
        activation("nope")
