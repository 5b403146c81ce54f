"""The adapter file format: round trip and every validation error, each naming its field."""

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.adapters.config_json import config_from_dict
from server.adapters.errors import AdapterError
from server.adapters.format import AdapterFile, tensor_name
from server.adapters.model_shape import ModelShape
from server.adapters.validation import validate
from server.reft.config import AdapterConfig
from server.reft.interventions import INTERVENTION_TYPES

MODEL = ModelShape(num_layers=4, hidden_size=16)


def make_adapter(kind="loreft", layers=(1, 3), rank=2, hidden=16, share_weights=True, seed=0, **config) -> AdapterFile:
    g = torch.Generator().manual_seed(seed)
    cfg = AdapterConfig(
        type=kind,
        rank=rank,
        hidden_size=hidden,
        layers=tuple(layers),
        positions="f1+l1",
        share_weights=share_weights,
        **config,
    )
    tensors = {}
    for layer in layers:
        for index in range(cfg.interventions_per_layer):
            for spec in INTERVENTION_TYPES[kind].params:
                shape = [{"d": hidden, "r": rank}[a] for a in spec.shape]
                t = (
                    torch.linalg.qr(torch.randn(*shape, generator=g))[0]
                    if spec.name == "rotation"
                    else torch.randn(*shape, generator=g)
                )
                tensors[tensor_name(layer, index, spec.name)] = t
    return AdapterFile(cfg, tensors)


@pytest.mark.parametrize("kind", sorted(INTERVENTION_TYPES))
def test_round_trip_through_bytes(kind):
    adapter = make_adapter(kind, share_weights=False)
    validate(adapter, MODEL)
    loaded = AdapterFile.from_bytes(adapter.to_bytes())
    assert loaded.config == adapter.config
    assert loaded.tensors.keys() == adapter.tensors.keys()
    for name in adapter.tensors:
        assert torch.equal(loaded.tensors[name], adapter.tensors[name])


def expect_error(adapter, field, pattern, model=MODEL):
    with pytest.raises(AdapterError, match=pattern) as info:
        validate(adapter, model)
    assert info.value.field == field


def test_hidden_size_must_match_the_model():
    expect_error(make_adapter(hidden=32), "hidden_size", "adapter has hidden_size 32, the model has 16")


def test_layer_out_of_range():
    expect_error(make_adapter(layers=(1, 4)), "layers", "layer 4 out of range: the model has 4 layers")


def test_tensor_shape_mismatch():
    adapter = make_adapter()
    adapter.tensors["layers.1.0.weight"] = torch.randn(3, 16)
    expect_error(adapter, "tensors.layers.1.0.weight", r"shape \[3, 16\] does not match \[2, 16\]")


def test_missing_tensor():
    adapter = make_adapter()
    del adapter.tensors["layers.3.0.bias"]
    expect_error(adapter, "tensors.layers.3.0.bias", "missing")


def test_unexpected_tensor():
    adapter = make_adapter()
    adapter.tensors["layers.2.0.bias"] = torch.zeros(2)
    expect_error(adapter, "tensors.layers.2.0.bias", "unexpected tensor")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(bad):
    adapter = make_adapter()
    adapter.tensors["layers.1.0.weight"][0, 0] = bad
    expect_error(adapter, "tensors.layers.1.0.weight", "NaN or infinite")


def test_rotation_must_be_orthonormal():
    adapter = make_adapter()
    adapter.tensors["layers.1.0.rotation"] = adapter.tensors["layers.1.0.rotation"] * 0.5
    expect_error(adapter, "tensors.layers.1.0.rotation", "not orthonormal")


def test_integer_tensor_rejected():
    adapter = make_adapter("lobireft")
    adapter.tensors["layers.1.0.bias"] = torch.ones(2, dtype=torch.int64)
    expect_error(adapter, "tensors.layers.1.0.bias", "floating-point")


VALID = {"type": "loreft", "rank": 2, "hidden_size": 16, "layers": [1], "positions": "f1+l1"}


@pytest.mark.parametrize(
    "change, field, pattern",
    [
        ({"type": "superreft"}, "type", "unknown intervention type 'superreft'"),
        ({"rank": 0}, "rank", "must be >= 1"),
        ({"rank": 17}, "rank", "exceeds hidden_size"),
        ({"rank": "2"}, "rank", "must be int"),
        ({"rank": True}, "rank", "must be int"),
        ({"hidden_size": 0}, "hidden_size", "must be >= 1"),
        ({"layers": []}, "layers", "at least one layer"),
        ({"layers": [1, 1]}, "layers", "duplicate layer"),
        ({"layers": [-1]}, "layers", "negative layer"),
        ({"layers": "1"}, "layers", "list of integers"),
        ({"positions": "middle"}, "positions", "invalid positions"),
        ({"activation": "swish2"}, "activation", "unknown activation"),
        ({"dtype": "int8"}, "dtype", "unknown dtype"),
        ({"format_version": 9}, "format_version", "unsupported version"),
        ({"colour": "red"}, "colour", "unknown field"),
    ],
)
def test_config_errors_name_the_field(change, field, pattern):
    with pytest.raises(AdapterError, match=pattern) as info:
        config_from_dict({**VALID, **change})
    assert info.value.field == field


@pytest.mark.parametrize("missing", ["type", "rank", "hidden_size", "layers", "positions"])
def test_missing_config_field(missing):
    raw = {k: v for k, v in VALID.items() if k != missing}
    with pytest.raises(AdapterError, match="missing") as info:
        config_from_dict(raw)
    assert info.value.field == missing


def test_not_a_safetensors_file():
    for data in (b"", b"hello world, not safetensors", struct.pack("<Q", 10**12) + b"{}"):
        with pytest.raises(AdapterError) as info:
            AdapterFile.from_bytes(data)
        assert info.value.field == "file"


def test_safetensors_without_reft_metadata():
    from safetensors.torch import save

    with pytest.raises(AdapterError, match="no 'reft' metadata") as info:
        AdapterFile.from_bytes(save({"x": torch.zeros(2)}))
    assert info.value.field == "metadata"


def test_metadata_that_is_not_json():
    from safetensors.torch import save

    with pytest.raises(AdapterError, match="not valid JSON"):
        AdapterFile.from_bytes(save({"x": torch.zeros(2)}, metadata={"reft": "{oops"}))


def test_truncated_file_is_rejected():
    data = make_adapter().to_bytes()
    with pytest.raises(AdapterError) as info:
        AdapterFile.from_bytes(data[: len(data) - 10])
    assert info.value.field == "file"


def test_metadata_is_readable_json_in_the_header():
    data = make_adapter().to_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert json.loads(header["__metadata__"]["reft"])["type"] == "loreft"


VALID_BYTES = make_adapter().to_bytes()


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=256)
    | st.builds(
        lambda cut, flips: bytes(b ^ 0xFF if i in flips else b for i, b in enumerate(VALID_BYTES[:cut])),
        st.integers(0, len(VALID_BYTES)),
        st.sets(st.integers(0, len(VALID_BYTES) - 1), max_size=8),
    )
)
def test_any_bytes_give_an_adapter_or_an_adapter_error(data):
    """Truncated, bit-flipped or random uploads never raise anything but AdapterError."""
    try:
        validate(AdapterFile.from_bytes(data), MODEL)
    except AdapterError:
        pass
