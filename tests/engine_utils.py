"""Helpers for engine tests: load a model for the engine, make random adapters, drive the core."""

from __future__ import annotations

import random

import torch

from server.adapters.materialize import materialize
from server.adapters.random_adapters import random_adapter_file
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.model_runner import ModelRunner
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from server.models.loader import load_causal_lm
from server.reft.adapter import Adapter
from server.reft.interventions import Intervention
from server.reft.request_edit import request_edit


def load_engine_model(path, dtype=torch.float32):
    return load_causal_lm(path, dtype)


def make_core(model, eos=frozenset(), make_runner=ModelRunner, grammars=None, **config) -> EngineCore:
    defaults = dict(num_blocks=256, block_size=8, max_batched_tokens=64, max_num_seqs=16, max_model_len=512)
    return EngineCore(model, EngineConfig(**{**defaults, **config}), set(eos), make_runner, grammars)


def random_adapter(name: str, *args, version: int = 1, **kwargs) -> Adapter:
    return materialize(random_adapter_file(*args, **kwargs), name=name, version=version)


def poisoned(adapter: Adapter) -> Adapter:
    """The adapter with finite weights that blow the hidden states up (all 3e38) in the first intervention
    of every layer it edits: the engine's edit check must fail its requests."""
    for interventions in adapter.layers.values():
        old = interventions[0]
        weight = torch.full_like(old.params["weight"], 3e38)
        interventions[0] = Intervention(old.kind, old.act, dict(old.params, weight=weight))
    return adapter


def assert_prefix_cache_finite(kv) -> list[int]:
    """Every block the prefix cache could hand to a later request holds finite keys and values; returns
    those blocks."""
    indexed = list(kv._key_of_block)
    for layer in range(kv.layout.num_layers):
        for pool in (kv.block_keys(layer), kv.block_values(layer)):
            assert all(torch.isfinite(pool[block]).all() for block in indexed)
    return indexed


def run_core(
    core: EngineCore,
    requests: list[tuple[Sequence, int]],
    max_steps: int = 100_000,
    finished: dict | None = None,
    scored: dict | None = None,
) -> dict[str, list[int]]:
    """Drive the core; each (sequence, arrival step) joins at that step. Returns generated ids; `finished`
    collects each request's (finish reason, error), `scored` its prompt tokens' logprobs where it asked."""
    pending = sorted(requests, key=lambda r: r[1])
    tokens: dict[str, list[int]] = {}
    step = 0
    while pending or core.has_work():
        while pending and pending[0][1] <= step:
            core.add(pending.pop(0)[0])
        for output in core.step():
            tokens.setdefault(output.request_id, []).extend(output.new_tokens)
            if output.finish_reason is not None and finished is not None:
                finished[output.request_id] = (output.finish_reason, output.error)
            if output.prompt_logprobs is not None and scored is not None:
                scored[output.request_id] = [sample.logprob for sample in output.prompt_logprobs]
        step += 1
        assert step < max_steps, "the engine did not finish"
    return tokens


def prompt(length: int, seed: int) -> list[int]:
    """A random prompt of `length` tokens, BOS first, of the tiny byte-level vocabulary."""
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 259) for _ in range(length - 1)]


def seq(request_id: str, prompt: list[int], adapter: Adapter | None = None, **sampling) -> Sequence:
    edit = request_edit(adapter, len(prompt))
    return Sequence(request_id, list(prompt), SamplingParams(**{"max_new_tokens": 10, **sampling}), edit)


def attention_ops(graph_module) -> int:
    """How many times a graph that torch.compile traced calls the engine's attention op."""
    return sum(node.target is torch.ops.reft.step_attention for node in graph_module.graph.nodes)
