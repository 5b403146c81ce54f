"""The eager steps' compiled decoder layers (`--compile`, compiled_layers.py), on the CPU: the plain
engine's tokens and logits with adapters' edits between the layers, one compilation for every layer and
step size (plus one for one-token steps), made at start-up, never used by a caller that did not ask, a
plain fallback when compiling fails, the step still found when torch.compile runs a layer eagerly, and
never from another thread."""

import threading

import pytest
import torch
from torch._dynamo import register_backend

from server.engine.attention import compiled_step
from server.engine.compiled_layers import compile_layers
from server.reft.layers import decoder_layers
from tests.engine_utils import attention_ops, load_engine_model, make_core
from tests.test_attention_backends import assert_backends_agree, mixed_requests

TRACED = []


@register_backend
def reft_layer_recording(graph_module, example_inputs):
    """Runs what Dynamo traced as it is, and keeps it for inspection."""
    TRACED.append(graph_module)
    return graph_module.forward


@register_backend
def reft_failing(graph_module, example_inputs):
    raise RuntimeError("planted compile failure")


@pytest.fixture
def llama(tiny_model_dir):
    return load_engine_model(tiny_model_dir("llama"))  # a model of its own: compiling changes its layers


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_inductor_layers_give_the_plain_tokens_and_logits_with_edits(llama, async_scheduling):
    options = {"compile_backend": "inductor", "async_scheduling": async_scheduling}
    core = assert_backends_agree(llama, ("sdpa", options), mixed_requests(llama, 10), max_batched_tokens=32)
    assert core.runner._compiled_layer_kwargs  # the steps asked for the compiled layers
    assert not compile_layers(llama, "inductor").failed


def test_one_compilation_serves_every_layer_and_step_size_and_is_made_at_start(llama, caplog):
    torch._dynamo.reset()  # nothing compiled by earlier tests may serve these steps
    TRACED.clear()
    # warm-up steps as long as the hidden size: the token count must not become that constant
    with caplog.at_level("INFO", logger="server.engine.core"):
        make_core(llama, compile_backend="reft_layer_recording", max_batched_tokens=llama.config.hidden_size)
    assert len(TRACED) == 2  # the warm-up steps: a full one, dynamic in its tokens, and a one-token one
    (record,) = [r for r in caplog.records if r.message == "decoder layers compiled for the steps that prefill"]
    assert record.fields["backend"] == "reft_layer_recording" and record.fields["compiled"]
    assert all(attention_ops(graph) == 1 for graph in TRACED)  # a layer's forward, not the model's
    # many step sizes over every layer (4 here), with adapters, chunked prefill and a fresh engine
    assert_backends_agree(
        llama, ("sdpa", {"compile_backend": "reft_layer_recording"}), mixed_requests(llama, 12), max_batched_tokens=24
    )
    assert len(TRACED) == 2


def test_callers_that_do_not_ask_get_the_plain_layers(llama):
    compile_layers(llama, "reft_layer_recording")
    TRACED.clear()
    assert_backends_agree(llama, ("paged", {"cuda_graphs": False}), mixed_requests(llama, 6), max_batched_tokens=32)
    input_ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(RuntimeError, match="runs only inside the engine"):  # plain: no compiled_step looked for
        llama(input_ids=input_ids)
    assert not TRACED


def test_a_backend_that_fails_leaves_the_layers_plain(llama, caplog):
    with caplog.at_level("ERROR", logger="server.engine.compiled_layers"):
        assert_backends_agree(
            llama, ("sdpa", {"compile_backend": "reft_failing"}), mixed_requests(llama, 6), max_batched_tokens=32
        )
    assert compile_layers(llama, "reft_failing").failed
    assert caplog.text.count("they run uncompiled") == 1


def test_another_backend_recompiles_from_the_plain_forwards(llama):
    first = compile_layers(llama, "reft_layer_recording")
    assert compile_layers(llama, "reft_layer_recording") is first
    second = compile_layers(llama, "inductor")
    assert second.plain_forwards == first.plain_forwards
    assert all(
        forward.__self__ is layer for forward, layer in zip(second.plain_forwards, decoder_layers(llama), strict=True)
    )


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="torch.compiler.set_stance came in torch 2.6")
def test_a_compiled_layer_run_eagerly_still_finds_its_step(llama):
    """torch.compile runs a frame eagerly past its recompile limit: the layer must serve all the same."""
    requests = mixed_requests(llama, 6)
    with torch.compiler.set_stance("force_eager"):
        assert_backends_agree(llama, ("paged", {"compile_backend": "inductor"}), requests, max_batched_tokens=32)


def test_a_step_is_found_only_on_its_own_thread(llama):
    """Engines step in threads: a forward on another thread must never attend over (and write into) the
    pool of a step that this thread's compiled layers run in."""
    errors = []

    def stray_forward():
        try:
            llama(input_ids=torch.tensor([[1, 2, 3]]))
        except RuntimeError as e:
            errors.append(str(e))

    with compiled_step(object()):  # stands in for a step in flight on this thread
        thread = threading.Thread(target=stray_forward)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "runs only inside the engine" in errors[0]
