"""Helpers for engine tests: load a model for the engine, make random adapters, drive the core."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from server.adapters.format import AdapterConfig, AdapterFile, tensor_name, validate
from server.engine.attention import ATTENTION_NAME
from server.engine.core import EngineConfig, EngineCore
from server.engine.sequence import SamplingParams, Sequence
from server.reft.adapter import Adapter
from server.reft.interventions import INTERVENTION_TYPES


def load_engine_model(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTENTION_NAME).eval()


def make_core(model, eos=frozenset(), **config) -> EngineCore:
    defaults = dict(num_blocks=256, block_size=8, max_batched_tokens=64, max_num_seqs=16, max_model_len=512)
    return EngineCore(model, EngineConfig(**{**defaults, **config}), set(eos))


def random_adapter_file(
    kind: str,
    layers: tuple[int, ...],
    rank: int,
    positions: str,
    hidden_size: int,
    share_weights: bool = True,
    seed: int = 0,
    scale: float = 1.0,
) -> AdapterFile:
    """A random adapter of `kind`, strong enough to change greedy outputs of a tiny model."""
    g = torch.Generator().manual_seed(seed)
    config = AdapterConfig(kind, rank, hidden_size, tuple(layers), positions, share_weights)
    tensors = {}
    for layer in layers:
        for index in range(config.interventions_per_layer):
            for spec in INTERVENTION_TYPES[kind].params:
                shape = [{"d": hidden_size, "r": rank}[axis] for axis in spec.shape]
                if spec.name == "rotation":
                    tensor = torch.linalg.qr(torch.randn(*shape, generator=g))[0].contiguous()
                else:
                    tensor = torch.randn(*shape, generator=g) * scale
                tensors[tensor_name(layer, index, spec.name)] = tensor
    adapter = AdapterFile(config, tensors)
    validate(adapter)
    return adapter


def random_adapter(name: str, *args, version: int = 1, **kwargs) -> Adapter:
    return Adapter.from_file(random_adapter_file(*args, **kwargs), name=name, version=version)


def run_core(core: EngineCore, requests: list[tuple[Sequence, int]], max_steps: int = 100_000) -> dict[str, list[int]]:
    """Drive the core; each (sequence, arrival step) joins at that step. Returns generated ids."""
    pending = sorted(requests, key=lambda r: r[1])
    tokens: dict[str, list[int]] = {}
    step = 0
    while pending or core.has_work():
        while pending and pending[0][1] <= step:
            core.add(pending.pop(0)[0])
        for output in core.step():
            tokens.setdefault(output.request_id, []).extend(output.new_tokens)
        step += 1
        assert step < max_steps, "the engine did not finish"
    return tokens


def seq(request_id: str, prompt: list[int], adapter: Adapter | None = None, **sampling) -> Sequence:
    return Sequence(request_id, list(prompt), SamplingParams(**{"max_new_tokens": 10, **sampling}), adapter)
