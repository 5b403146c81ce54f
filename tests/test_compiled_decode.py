"""The compiled decode forward (`--compile`), on the CPU, where its graphs' padded buffers run uncaptured:
torch.compile traces the model around one opaque attention op per layer and gives the sdpa backend's
tokens and logits, with Inductor as well as with a backend that only records what was traced."""

import pytest
import torch
from torch._dynamo import register_backend
from torch._dynamo.utils import counters

from server.config import Settings
from tests.engine_utils import attention_ops, load_engine_model
from tests.test_attention_backends import assert_backends_agree, mixed_requests

TRACED = []


@register_backend
def reft_recording(graph_module, example_inputs):
    """Runs what Dynamo traced as it is, and keeps it for inspection."""
    TRACED.append(graph_module)
    return graph_module.forward


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return load_engine_model(tiny_model_dir("llama"))


def compiled(backend: str):
    return "paged", {"cuda_graphs": True, "compile_backend": backend}


def test_the_traced_forward_calls_the_attention_op_once_per_layer(llama):
    TRACED.clear()
    assert_backends_agree(llama, compiled("reft_recording"), mixed_requests(llama, 10), max_batched_tokens=32)
    # the eager steps' layers (test_compiled_layers.py) are traced one layer to a graph; the decode forward
    # whole: batch size 1, then one graph dynamic in the batch size
    forwards = [graph for graph in TRACED if attention_ops(graph) != 1]
    assert forwards
    assert all(attention_ops(graph) == llama.config.num_hidden_layers for graph in forwards)
    traced = len(TRACED)
    assert_backends_agree(llama, compiled("reft_recording"), mixed_requests(llama, 6), max_batched_tokens=32)
    assert len(TRACED) == traced  # a second engine over the same model reuses the compiled forward


def test_inductor_gives_the_sdpa_tokens_and_logits(llama):
    graphs_before = counters["stats"]["unique_graphs"]
    assert_backends_agree(llama, compiled("inductor"), mixed_requests(llama, 10), max_batched_tokens=32)
    assert counters["stats"]["unique_graphs"] > graphs_before  # compiled, not run eagerly past a cache limit


def test_the_attention_op_runs_only_inside_a_compiled_step():
    query = torch.zeros(1, 2, 1, 4)
    with pytest.raises(RuntimeError, match="compiled_step"):
        torch.ops.reft.step_attention(query, query, query, 0, None, None)


def test_the_setting_asks_for_inductor():
    assert Settings(compile=True).engine_config("cpu").compile_backend == "inductor"
    assert Settings().engine_config("cpu").compile_backend is None


def test_a_forward_that_fails_to_compile_or_capture_falls_back_to_the_plain_graphs(llama, monkeypatch, caplog):
    from server.engine.cuda_graphs import DecodeGraphs
    from tests.engine_utils import make_core

    def capture_all(self, largest_only=False):  # stands in for an Inductor or capture error on a GPU
        if self._compiled is not None:
            raise RuntimeError("planted compile failure")

    monkeypatch.setattr(DecodeGraphs, "capture_all", capture_all)
    with caplog.at_level("ERROR", logger="server.engine.model_runner"):
        core = make_core(llama, attention_backend="paged", cuda_graphs=True, compile_backend="inductor")
    assert core.runner.graphs is not None and core.runner.graphs._compiled is None
    assert "they run uncompiled" in caplog.text
