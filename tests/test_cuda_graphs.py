"""The CUDA-graph decode path's bookkeeping, on the CPU, where its padded persistent buffers run
uncaptured: bucket sizes, which steps it takes, padding rows that leave the pad block zero and change
no real row, and a logits buffer that is only valid until the next step. (Token parity with the sdpa
backend over whole workloads is in test_attention_backends.py; capture itself in test_gpu_engine.py.)"""

import pytest
import torch

from server.engine.cuda_graphs import DecodeGraphs, bucket_sizes
from server.engine.model_runner import ModelRunner
from server.engine.scheduler import ScheduledChunk
from tests.engine_utils import load_engine_model, make_core, prompt, random_adapter, seq


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return load_engine_model(tiny_model_dir("llama"))


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    assert bucket_sizes(128) == [1, 2, 4, *range(8, 129, 8)]


def decoding_core(model, count, **config):
    """A paged core whose `count` sequences have all been prefilled and sampled once."""
    core = make_core(model, attention_backend="paged", max_num_seqs=12, **config)
    for i in range(count):
        core.add(seq(f"s{i}", prompt(5 + 7 * i, i), max_new_tokens=8))
    while any(s.num_uncomputed > 1 for s in core.sequences.values()):
        core.step()
    return core


def decode_batch(core):
    chunks = [ScheduledChunk(s, s.num_computed, 1) for s in core.scheduler.running]
    for chunk in chunks:
        core.kv.allocate(chunk.seq, 1)
    return core.runner.pack(chunks)[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # llama's token 0 embeds to zeros, GPT-2's does not
def test_a_padded_step_matches_eager_and_leaves_the_pad_block_zero(tiny_model_dir, family):
    model = load_engine_model(tiny_model_dir(family))
    core = decoding_core(model, 3)  # 3 rows: bucket 4, one padding row
    graphs = core.runner.graphs
    batch = decode_batch(core)
    assert graphs.fits(batch)
    replays = graphs.steps_run
    replayed = core.runner.forward(batch)[0].clone()
    assert graphs.steps_run == replays + 1
    pad = slice(core.kv.pad_block * core.kv.block_size, (core.kv.pad_block + 1) * core.kv.block_size)
    assert not core.kv.keys[:, pad].any() and not core.kv.values[:, pad].any()
    eager = ModelRunner(model, core.kv, "sdpa").forward(batch)[0]  # rewrites the same slots with the same K/V
    torch.testing.assert_close(replayed, eager, atol=2e-5, rtol=1e-5)


def test_only_plain_decode_steps_take_the_graphs(llama, tiny_model_dir):
    core = decoding_core(llama, 2)
    graphs = core.runner.graphs
    batch = decode_batch(core)
    assert graphs.fits(batch)
    chunk = ScheduledChunk(core.scheduler.running[0], 0, 4)  # a prefill chunk
    prefill = core.runner.pack([chunk])[0]
    assert not graphs.fits(prefill)
    adapter = random_adapter("a", "loreft", (1,), 2, "l1", llama.config.hidden_size, seed=0)
    edited = seq("e", prompt(6, 9), adapter)  # its last prompt token is edited, in the step that computes it
    core.add(edited)
    core.kv.allocate(edited, 6)
    with_edit = core.runner.pack([ScheduledChunk(edited, 5, 1)])[0]
    assert with_edit.edits and not graphs.fits(with_edit)


def test_logits_are_a_view_valid_until_the_next_step(llama):
    core = decoding_core(llama, 2)
    graphs = core.runner.graphs
    first = core.runner.forward(decode_batch(core))[0]
    kept = first.clone()
    core.scheduler.complete([ScheduledChunk(s, s.num_computed, 1) for s in core.scheduler.running])
    for s in core.scheduler.running:
        s.token_ids.append(7)
    core.runner.forward(decode_batch(core))
    assert first.data_ptr() == graphs.logits.data_ptr()
    assert not torch.equal(first, kept)  # overwritten in place: the core samples before the next step


def test_graphs_only_with_the_paged_backend(llama):
    assert make_core(llama, attention_backend="sdpa", cuda_graphs=True).runner.graphs is None
    assert make_core(llama, attention_backend="paged", cuda_graphs=False).runner.graphs is None
    assert isinstance(make_core(llama, attention_backend="paged").runner.graphs, DecodeGraphs)
