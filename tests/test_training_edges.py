"""Training and the adapter formats at their edges: activations no file can carry, interventions that raise, data
and devices the trainer cannot take, square pyreft rotations (found by a review of training and formats)."""

import json

import pytest
import torch
from transformers import AutoTokenizer
from transformers.activations import ACT2FN

from server.adapters.errors import AdapterError
from server.adapters.materialize import materialize
from server.adapters.random_adapters import random_adapter_file
from server.adapters.validation import validate
from server.reft.interventions import INTERVENTION_TYPES, InterventionType, ParamSpec, linear_bias_init
from server.reft.reference import reference_generate
from server.training.data import parse_examples
from server.training.trainer import train_adapter
from tests.conftest import load_reference_model


@pytest.fixture(scope="module")
def gpt2(tiny_model_dir):
    path = tiny_model_dir("gpt2")
    return load_reference_model(path), AutoTokenizer.from_pretrained(path)


def examples_of(tokenizer, *pairs):
    return parse_examples([json.dumps({"prompt": p, "completion": c}) for p, c in pairs], tokenizer)


@pytest.mark.parametrize("name", sorted(ACT2FN))
def test_every_accepted_activation_serves_a_bf16_model(name):
    """An activation holding learned parameters (prelu, xielu) passed validation, yet its fp32 weights
    (on the CPU, never in the file) broke every bf16 (and every GPU) forward of the adapter."""
    adapter = random_adapter_file("loreft", (0,), 4, "f1+l1", hidden_size=16)
    adapter.config = type(adapter.config)(**{**adapter.config.__dict__, "activation": name})
    try:
        validate(adapter)
    except AdapterError as e:
        assert e.field == "activation"
        return
    (intervention,) = materialize(adapter, name="a", dtype=torch.bfloat16).layers[0]
    assert intervention(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_an_example_longer_than_the_context_window_is_a_clear_error(gpt2):
    """Was an IndexError from GPT-2's position embedding (a device assert on CUDA), after loading."""
    model, tokenizer = gpt2
    window = model.config.max_position_embeddings
    examples = examples_of(tokenizer, ("a", "b"), ("x" * window, "y"))
    with pytest.raises(ValueError, match=f"example 2 .* context window of {window}"):
        train_adapter(model, examples, layers=[0], epochs=1)


def _broken(h, p, act):
    raise RuntimeError("the plugin's formula is broken")


BROKEN = InterventionType("hunt_broken", _broken, (ParamSpec("bias", ("r",), linear_bias_init),))


def test_a_failing_intervention_fails_training_with_its_own_error(gpt2, monkeypatch):
    """The step plan's fallback swallowed the formula's exception (it keeps one adapter from failing
    a served step): training ran unedited and died on 'does not require grad'."""
    model, tokenizer = gpt2
    monkeypatch.setitem(INTERVENTION_TYPES, BROKEN.name, BROKEN)
    with pytest.raises(RuntimeError, match="the plugin's formula is broken"):
        train_adapter(model, examples_of(tokenizer, ("a", "b")), layers=[0], intervention_type=BROKEN.name)


def test_the_reference_generator_fails_with_a_failing_intervention(gpt2):
    """The yardstick silently generated the base model's tokens when the adapter's edit raised."""
    model, _ = gpt2
    adapter = random_adapter_file("loreft", (0,), 4, "f1+l1", hidden_size=model.config.hidden_size)
    served = materialize(adapter, name="a")
    broken = served.layers[0][0]
    served.layers[0][0] = type(broken)(BROKEN, broken.act, broken.params)
    with pytest.raises(RuntimeError, match="the plugin's formula is broken"):
        reference_generate(model, [1, 5, 6, 7], served, max_new_tokens=2)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a\\ud800", "completion": "b"}', "lone surrogate"),
        ('{"messages": [{"role": "user", "content": "\\udc00"}, {"role": "assistant", "content": "b"}]}', "surrogate"),
        ("[" * 100_000 + "]" * 100_000, "nested too deep"),
    ],
)
def test_data_the_tokenizer_or_the_parser_cannot_take_names_its_line(gpt2, line, message):
    """Were a TypeError from the tokenizer and a RecursionError from json: tracebacks from the CLI."""
    _, tokenizer = gpt2
    with pytest.raises(ValueError, match=f"data.jsonl, line 2: .*{message}"):
        parse_examples(['{"prompt": "a", "completion": "b"}', line], tokenizer, source="data.jsonl")


def test_training_leaves_the_callers_gpu_generators_alone(gpt2, monkeypatch):
    """torch.manual_seed reseeds every CUDA device as well: fork_rng(devices=[]) did not restore them."""
    model, tokenizer = gpt2
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    train_adapter(model, examples_of(tokenizer, ("a", "b")), layers=[0], epochs=1, seed=7)
    assert reseeded == []


def test_a_square_rotation_imports_as_torch_computes_it():
    """rank == hidden size: torch's orthogonal parametrization then uses matrix_exp, not Householder
    reflections; reading it as Householder gave another orthonormal matrix, which validated."""
    from server.adapters.pyreft import orthogonal_from_parametrization

    torch.manual_seed(0)
    layer = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(6, 6, bias=False))
    with torch.no_grad():  # move away from the initial point, as training does
        layer.parametrizations.weight.original.add_(0.3 * torch.randn(6, 6))
    state = layer.state_dict()
    got = orthogonal_from_parametrization(
        state["parametrizations.weight.original"], state["parametrizations.weight.0.base"]
    )
    torch.testing.assert_close(got, layer.weight, rtol=1e-5, atol=1e-6)


def test_data_whose_prompts_no_position_reaches_is_a_clear_error(gpt2):
    """Every batch had no gradient: 'element 0 of tensors does not require grad'."""
    model, tokenizer = gpt2
    examples = examples_of(tokenizer, ("a", "b"), ("bc", "d"))
    with pytest.raises(ValueError, match="positions 10 edit no prompt token of any example"):
        train_adapter(model, examples, layers=[0], epochs=1, positions="10")


@pytest.mark.parametrize("batch_size", [1, 2])
def test_an_example_no_position_reaches_trains_beside_the_others(gpt2, batch_size):
    """As before such examples were refused (a review found the regression): alone in a batch (batch size
    1) it is skipped, beside others it counts in the loss and teaches nothing."""
    model, tokenizer = gpt2
    examples = examples_of(tokenizer, ("a prompt long enough for position ten", "b"), ("short", "c"))
    result = train_adapter(model, examples, layers=[0], epochs=2, batch_size=batch_size, positions="10")
    assert len(result.epoch_losses) == 2


@pytest.mark.parametrize("device", ["nonsense", "cuda:99"])
def test_a_bad_device_is_a_clear_error(tiny_model_dir, tmp_path, capsys, device):
    """Were a RuntimeError and an AssertionError (torch built without CUDA) out of `train`."""
    from tests.test_train import run_cli

    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    out = tmp_path / "a.safetensors"
    assert run_cli(tiny_model_dir("gpt2"), data, "--layers", "0", "--device", device, "--out", out) == 1
    assert f"error: --device {device!r}" in capsys.readouterr().err
