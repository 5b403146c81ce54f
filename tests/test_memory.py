"""KV pool sizing: the arithmetic of `--gpu-memory-utilization`, the CPU default, and the warm-up step
that measures the activation peak on a GPU (run here on the CPU, where it must work the same)."""

import pytest

from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.kv_cache import KVLayout
from server.engine.memory import CPU_DEFAULT_BYTES, budget_from_measurements
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
    result = EngineCore._warm_up_step(model, layout, EngineConfig(max_batched_tokens=300, block_size=16))
    assert result.logits.shape == (1, model.config.vocab_size) and result.logits.isfinite().all()
