"""`step_token_multiple`: the steps run eagerly are padded with rows of their own up to a multiple of that
many tokens (model_runner.py's `padded`), so that their matrix products see a few shapes. The padding rows
write into the pool's pad block alone and are never sampled or edited: every request's tokens, prompt
logprobs and finish are those of the unpadded engine, under every attention backend, and the pad block is
all zeros again after each step."""

import random

import pytest
import torch

from server.cli import build_parser, settings_from_args
from server.config import Settings
from server.engine.attention import Span
from server.engine.kv_cache import KVCache, KVLayout
from server.engine.model_runner import ModelRunner, StepBatch, padded
from server.models.tiny import build_tiny_model
from tests.engine_utils import load_engine_model, make_core, prompt, random_adapter, run_core, seq


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return load_engine_model(tiny_model_dir("llama"))


def test_padding_rows_are_one_chunk_over_the_pad_block(llama):
    kv = KVCache(KVLayout.from_config(llama.config, torch.float32), 8, 4, "cpu")
    batch = StepBatch([5, 6, 7, 8, 9], [0, 1, 2, 3, 4], [8, 9, 10, 11, 12], [Span(0, 5, 0, [2, 3])], [], [4], [])
    assert padded(batch, 1, kv) is batch and padded(batch, 5, kv) is batch
    rows = padded(batch, 4, kv)  # 3 rows
    pad = kv.pad_block * kv.block_size
    assert rows.token_ids == [5, 6, 7, 8, 9, 0, 0, 0] and rows.positions[5:] == [0, 0, 0]
    assert rows.slots[5:] == [pad, pad + 1, pad + 2] and rows.spans[-1] == Span(5, 3, 0, [kv.pad_block], True)
    assert rows.keep == batch.keep and rows.edits == batch.edits
    rows = padded(batch, 6, kv)  # one row would be a decode row, which must come first: 1 + 6 rows instead
    assert len(rows.token_ids) == 12 and rows.spans[-1] == Span(5, 7, 0, [kv.pad_block] * 2, True)
    assert rows.slots[5:] == [pad + p % 4 for p in range(7)] and rows.positions[5:] == [0] * 7


def workload(model):
    """Prompts of many lengths (so most steps need padding), half of them edited by one of two adapters,
    some scoring their prompt, arriving over the first steps."""
    rng = random.Random(3)
    hidden = model.config.hidden_size
    adapters = [random_adapter(f"a{i}", "loreft", (0, 1), 4, "f3+l3", hidden, seed=i) for i in range(2)]
    requests = []
    for i in range(12):
        sampling = {"max_new_tokens": rng.randint(3, 12)} | ({"prompt_logprobs": 1} if i % 5 == 0 else {})
        request = seq(f"r{i}", prompt(rng.randint(2, 70), i), (adapters + [None, None])[i % 4], **sampling)
        requests.append((request, rng.randint(0, 6)))
    return requests


def served(model, **config):
    """Every request's tokens, finish and prompt logprobs; each step checked to leave the pad block all zeros."""
    core = make_core(model, max_batched_tokens=48, max_num_seqs=6, async_scheduling=True, **config)
    step = core.step

    def checked_step():
        outputs = step()
        pad = slice(core.kv.pad_block * core.kv.block_size, (core.kv.pad_block + 1) * core.kv.block_size)
        assert not core.kv.keys[:, pad].any() and not core.kv.values[:, pad].any()
        return outputs

    core.step = checked_step
    finished, scored = {}, {}
    tokens = run_core(core, workload(model), finished=finished, scored=scored)
    return tokens, finished, scored


@pytest.mark.parametrize("backend", ["sdpa", "paged", "flex"])
def test_padded_steps_give_every_request_what_the_unpadded_engine_gives(llama, backend, monkeypatch):
    expected = served(llama, attention_backend=backend)
    zeroed = []
    clear = KVCache.zero_pad_block
    monkeypatch.setattr(KVCache, "zero_pad_block", lambda kv: zeroed.append(1) or clear(kv))
    assert served(llama, attention_backend=backend, step_token_multiple=16) == expected
    assert zeroed  # steps were padded


def test_padding_stays_within_a_models_learned_positions(tmp_path):
    """GPT-2 looks its positions up in a table (96 here): up to 129 padding rows must not index past it."""
    model = load_engine_model(build_tiny_model("gpt2", tmp_path, max_positions=96))
    expected = served(model, max_model_len=96)
    assert served(model, max_model_len=96, step_token_multiple=128) == expected


def test_every_eager_step_runs_a_multiple_of_the_tokens(llama, monkeypatch):
    sizes = []  # (the step's own tokens, the rows its forward ran)
    stage = ModelRunner._stage

    def recorded(self, batch):
        inputs = stage(self, batch)
        sizes.append((len(batch.token_ids), inputs.input_ids.shape[0]))
        return inputs

    monkeypatch.setattr(ModelRunner, "_stage", recorded)
    served(llama, step_token_multiple=16)
    assert all(rows % 16 == 0 and rows >= tokens for tokens, rows in sizes)
    assert any(rows > tokens for tokens, rows in sizes)


def test_the_flag_reaches_the_engine():
    assert Settings().engine_config("cuda").step_token_multiple == 1
    args = build_parser().parse_args(["serve", "--step-token-multiple", "64"])
    assert settings_from_args(args).engine_config("cuda").step_token_multiple == 64
    with pytest.raises(ValueError):
        Settings(step_token_multiple=0)
