"""KV pool sizing: the arithmetic of `--gpu-memory-utilization`, the CPU default, the warm-up step
that measures the activation peak on a GPU (run here on the CPU, where it must work the same), and
the room set aside for the decode graphs (measured on CUDA only: test_gpu_engine.py)."""

import pytest
import torch

import server.engine.core as core_module
import server.engine.sampler as sampler_module
from server.engine import memory
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.kv_cache import KVLayout
from server.engine.memory import CPU_DEFAULT_BYTES, budget_from_measurements
from server.engine.sampling_params import MAX_LOGPROBS
from tests.engine_utils import load_engine_model


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_engine_model(tiny_model_dir("llama"))


def test_the_pool_gets_the_allowed_share_less_what_is_held_and_the_peak():
    gib = 2**30
    assert budget_from_measurements(80 * gib, 3 * gib, 2 * gib, 0.9) == int(72 * gib) - 5 * gib
    assert budget_from_measurements(80 * gib, 70 * gib, 4 * gib, 0.9) < 0  # refused by auto_kv_budget


def test_auto_on_a_cpu_takes_the_default_budget(model):
    core = EngineCore(model, EngineConfig(kv_cache_bytes=None, max_model_len=256), set())
    layout = KVLayout.from_config(model.config, next(model.parameters()).dtype)
    per_block = layout.bytes_per_token() * core.kv.block_size
    assert core.kv.num_blocks == CPU_DEFAULT_BYTES // per_block - 1


def test_the_warm_up_step_runs_the_largest_prefill(model):
    layout = KVLayout.from_config(model.config, next(model.parameters()).dtype)
    result = EngineCore._warm_up_step(model, layout, EngineConfig(max_batched_tokens=300, block_size=16), None)
    assert result.logits.shape == (1, model.config.vocab_size) and result.logits.isfinite().all()


def test_the_warm_up_step_draws_for_every_row_a_step_may_sample_through_the_costliest_path(model, monkeypatch):
    """The sampler's float32 copies and top-k/top-p sort of a full step's rows must peak inside the warm-up,
    whose peak the KV budget leaves room for."""
    filtered, tabled = [], []
    filter_logits, logprob_table = sampler_module.filter_logits, sampler_module.logprob_table
    monkeypatch.setattr(
        sampler_module, "filter_logits", lambda logits, *a: filtered.append(logits) or filter_logits(logits, *a)
    )
    monkeypatch.setattr(
        sampler_module, "logprob_table", lambda t, lp, top: tabled.append(top) or logprob_table(t, lp, top)
    )
    layout = KVLayout.from_config(model.config, next(model.parameters()).dtype)
    EngineCore._warm_up_step(model, layout, EngineConfig(max_batched_tokens=64, block_size=16, max_num_seqs=48), None)
    assert [tuple(logits.shape) for logits in filtered] == [(48, model.config.vocab_size)]
    assert filtered[0].dtype == torch.float32 and tabled[-1] == MAX_LOGPROBS


@pytest.mark.parametrize(
    "backend, graphs, measured", [("paged", True, True), ("paged", False, False), ("sdpa", True, False)]
)
def test_auto_sizing_sets_room_aside_for_the_decode_graphs_only_when_they_will_be_captured(
    model, monkeypatch, backend, graphs, measured
):
    asked = []

    def fake_budget(model, warm_up, utilization, graphs_bytes=None):
        asked.append(graphs_bytes)
        return CPU_DEFAULT_BYTES

    monkeypatch.setattr(core_module, "auto_kv_budget", fake_budget)
    config = EngineConfig(kv_cache_bytes=None, max_model_len=256, attention_backend=backend, cuda_graphs=graphs)
    EngineCore(model, config, set())
    assert (asked[0] is not None) == measured


def test_a_failed_graph_measurement_keeps_no_room_and_does_not_stop_sizing(monkeypatch):
    monkeypatch.setattr(memory.torch.cuda, "empty_cache", lambda: None)

    def fails():
        raise RuntimeError("capture failed")

    assert memory._graphs_bytes(fails) == 0
    assert memory._graphs_bytes(lambda: 3 * 2**20) == 3 * 2**20
