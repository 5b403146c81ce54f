"""The shared pyreft fixture (real pyreft checkpoints of all six types and pyreft's own greedy outputs,
tests/fixtures/pyreft_reference) through the engine on one device, every case in one mixed batch.

Counts, per dtype, how many requests reproduce pyreft's tokens exactly (with and without their adapter),
and how many agree with the slow reference path (server.reft.reference) run in the same dtype on the
same device. In bfloat16 pyreft's fp32 tokens may drift after a near tie; the engine should still agree
with the reference computed in bfloat16. Where the device's default attention backend is not sdpa (on
CUDA: paged, with CUDA graphs), the engine also runs with sdpa, and the counts say how often each matches.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from server.adapters.materialize import materialize
from server.adapters.model_shape import ModelShape
from server.adapters.pyreft import import_pyreft
from server.engine.attention import ATTENTION_NAME
from server.engine.config import EngineConfig, resolve_attention_backend
from server.engine.core import EngineCore
from server.engine.sampler import Draw
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from server.engine.transfers import HostCopy
from server.models.loader import load_causal_lm
from server.reft.adapter import Adapter
from server.reft.reference import reference_generate
from server.reft.request_edit import request_edit


def load_fixture_adapter(fixture: Path, name: str, shape: ModelShape, dtype: torch.dtype, device) -> Adapter:
    """A pyreft checkpoint of the fixture, imported with the positions and weight sharing it was trained with."""
    directory = fixture / "adapters" / name
    recorded = json.loads((directory / "positions.json").read_text())
    sides = (recorded["first"] and f"f{recorded['first']}", recorded["last"] and f"l{recorded['last']}")
    adapter_file = import_pyreft(
        directory, positions="+".join(s for s in sides if s), share_weights=recorded["share_weights"], model=shape
    )
    return materialize(adapter_file, name=name, version=1, dtype=dtype, device=device)


def fixture_core(
    model, prompts: dict[str, tuple[list[int], Adapter | None]], max_new_tokens: dict[str, int], attention_backend: str
) -> EngineCore:
    """An engine with every request added before the first step (the default KV budget holds the fixture's
    requests many times over, so they all run together)."""
    config = EngineConfig(max_num_seqs=len(prompts), max_batched_tokens=1024, attention_backend=attention_backend)
    core = EngineCore(model, config, eos_token_ids=set())
    for request_id, (prompt, adapter) in prompts.items():
        sampling = SamplingParams(max_new_tokens=max_new_tokens[request_id])
        core.add(Sequence(request_id, list(prompt), sampling, request_edit(adapter, len(prompt))))
    return core


def engine_tokens(
    model, prompts: dict[str, tuple[list[int], Adapter | None]], max_new_tokens: int, attention_backend: str = "auto"
) -> dict:
    """Greedy tokens of every request, all served together."""
    core = fixture_core(model, prompts, dict.fromkeys(prompts, max_new_tokens), attention_backend)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in prompts}
    while core.has_work():
        for output in core.step():
            if output.error:
                raise RuntimeError(f"request {output.request_id} failed: {output.error}")
            tokens[output.request_id] += output.new_tokens
    return tokens


def fixture_requests(fixture: Path, cases: list[dict], model, dtype: torch.dtype, device) -> dict:
    """Every case twice, as `adapter{i}` with its adapter and as `base{i}` without: id -> (prompt, adapter)."""
    shape = ModelShape(model.config.num_hidden_layers, model.config.hidden_size)
    names = {case["adapter"] for case in cases}
    adapters = {name: load_fixture_adapter(fixture, name, shape, dtype, device) for name in names}
    prompts = {}
    for index, case in enumerate(cases):
        prompts[f"adapter{index}"] = (case["prompt_ids"], adapters[case["adapter"]])
        prompts[f"base{index}"] = (case["prompt_ids"], None)
    return prompts


def fixture_parity(fixture: Path, device, dtype: torch.dtype, max_cases: int | None = None) -> dict:
    expected = json.loads((fixture / "expected.json").read_text())
    cases, max_new_tokens = expected["cases"][:max_cases], expected["max_new_tokens"]
    engine_model = _load(fixture, dtype, ATTENTION_NAME, device)
    prompts = fixture_requests(fixture, cases, engine_model, dtype, device)
    served = engine_tokens(engine_model, prompts, max_new_tokens)
    # where the device's default backend is not sdpa (CUDA), sdpa's tokens are the bar it must meet
    gathered = None
    if resolve_attention_backend("auto", torch.device(device).type) != "sdpa":
        gathered = engine_tokens(engine_model, prompts, max_new_tokens, "sdpa")
    del engine_model
    reference_model = _load(fixture, dtype, "sdpa", device)
    reference = {
        request_id: reference_generate(reference_model, prompt, adapter, max_new_tokens=max_new_tokens)
        for request_id, (prompt, adapter) in prompts.items()
    }
    # the base cases repeat a few prompts (one per adapter), so their counts move in steps of a prompt's cases
    counts = {"cases": len(cases), "base_prompts": len({tuple(case["prompt_ids"]) for case in cases})}
    for kind, pyreft_key in (("adapter", "adapter_tokens"), ("base", "base_tokens")):
        pairs = [(f"{kind}{index}", case[pyreft_key]) for index, case in enumerate(cases)]
        counts[f"{kind}_engine_vs_pyreft"] = sum(served[i] == pyreft for i, pyreft in pairs)
        counts[f"{kind}_reference_vs_pyreft"] = sum(reference[i] == pyreft for i, pyreft in pairs)
        counts[f"{kind}_engine_vs_reference"] = sum(served[i] == reference[i] for i, _ in pairs)
        if gathered is not None:
            counts[f"{kind}_sdpa_engine_vs_pyreft"] = sum(gathered[i] == pyreft for i, pyreft in pairs)
            counts[f"{kind}_engine_vs_sdpa_engine"] = sum(served[i] == gathered[i] for i, _ in pairs)
    return counts


class ForcedSampler:
    """Stands in for the engine's sampler: keeps each row's logits and "draws" the token `forced` gives, so
    that two engines see the same token history and their logits can be compared position by position."""

    def __init__(self, forced: dict[str, list[int]]):
        self.forced = forced
        self.logits: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, logits, seqs, pending=None) -> Draw:
        for row, seq in enumerate(seqs):
            self.logits[(seq.request_id, seq.num_generated)] = logits[row].float()
        tokens = torch.tensor([self.forced[s.request_id][s.num_generated] for s in seqs], device=logits.device)
        return Draw(tokens, HostCopy(tokens), [None] * len(seqs))


def forced_logits(model, prompts, forced: dict[str, list[int]], attention_backend: str) -> dict:
    """Every request's logits at every generated position, with pyreft's tokens fed back (`forced`)."""
    lengths = {request_id: len(tokens) for request_id, tokens in forced.items()}
    core = fixture_core(model, prompts, lengths, attention_backend)
    core.sampler = sampler = ForcedSampler(forced)
    while core.has_work():
        core.step()
    return sampler.logits


def forced_logit_error(
    fixture: Path, device, dtype: torch.dtype, max_cases: int | None = None, backends: tuple[str, ...] | None = None
) -> dict:
    """How far each attention backend's logits in `dtype` are from the engine's in float32 when both are fed
    pyreft's tokens: the mean absolute error, and each position where the top token differs (a flip) with
    float32's margin between its top two there. Whole greedy sequences only say which near ties flipped;
    this says which backend computes closer to float32. `backends`: sdpa and the device's default."""
    expected = json.loads((fixture / "expected.json").read_text())
    cases = expected["cases"][:max_cases]
    forced = {}
    for index, case in enumerate(cases):
        forced[f"adapter{index}"], forced[f"base{index}"] = case["adapter_tokens"], case["base_tokens"]
    backends = backends or tuple(dict.fromkeys(["sdpa", resolve_attention_backend("auto", torch.device(device).type)]))
    measured = {}  # (precision, backend) -> logits; float32 with sdpa is the truth
    for precision, precision_backends in ((torch.float32, ("sdpa",)), (dtype, backends)):
        model = _load(fixture, precision, ATTENTION_NAME, device)
        prompts = fixture_requests(fixture, cases, model, precision, device)
        for backend in precision_backends:
            measured[(precision, backend)] = forced_logits(model, prompts, forced, backend)
        del model
    truth = measured[(torch.float32, "sdpa")]
    results = {}
    for backend in backends:
        logits = measured[(dtype, backend)]
        errors = [float((logits[key] - exact).abs().mean()) for key, exact in truth.items()]
        flips = [key for key, exact in truth.items() if int(logits[key].argmax()) != int(exact.argmax())]
        margins = [float(truth[key].topk(2).values.diff().abs()) for key in flips]
        results[backend] = {
            "positions": len(errors),
            "mean_abs_error": sum(errors) / len(errors),
            "flips": len(flips),
            "largest_float32_margin_at_a_flip": max(margins, default=0.0),
        }
    return results


def _load(fixture: Path, dtype: torch.dtype, attention: str, device):
    model = load_causal_lm(fixture / "model", dtype, attention)
    return model.to(device).eval().requires_grad_(False)
