"""Scoring benchmark: prompts scored as lm-evaluation-harness scores them through the server (`echo` with
`logprobs: 1` and `max_tokens: 1`, i.e. every prompt token's logprob and top-1), measured in one run on one
machine and printed as ratios of scored prompt tokens per second:

1. the engine scoring, against the same requests not scoring (the cost of the logits rows and the
   log-softmax that scoring adds to prefill steps);
2. the engine scoring, against a plain HF forward over right-padded batches followed by a log-softmax,
   which is what a user would write without a server (base model only: HF has no adapters).

    python bench/scoring.py --preset small --requests 64 --adapters 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Request, add_model_arguments, load, machine, make_adapters, stamp, workload  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.core import EngineCore  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402
from server.engine.sequence import Sequence  # noqa: E402
from server.reft.request_edit import request_edit  # noqa: E402


def engine_seconds(core: EngineCore, requests: list[Request], adapters, scored: bool) -> float:
    """Seconds to serve every request at once, one token each, scoring the prompts if `scored`."""
    core.kv.reset_prefix_cache()
    sampling = SamplingParams(max_new_tokens=1, ignore_eos=True, logprobs=1, prompt_logprobs=1 if scored else None)
    started = time.perf_counter()
    for index, request in enumerate(requests):
        adapter = adapters[request.adapter] if request.adapter is not None else None
        core.add(Sequence(str(index), request.prompt, sampling, request_edit(adapter, len(request.prompt))))
    scores = 0
    while core.has_work():
        scores += sum(len(output.prompt_logprobs or ()) for output in core.step())
    assert scores == (sum(len(r.prompt) - 1 for r in requests) if scored else 0)
    return time.perf_counter() - started


@torch.inference_mode()
def hf_seconds(model, requests: list[Request], batch_size: int) -> float:
    """Seconds for a plain forward per batch of right-padded prompts, each token's log-probability gathered."""
    device = next(model.parameters()).device
    started = time.perf_counter()
    for begin in range(0, len(requests), batch_size):
        batch = [r.prompt for r in requests[begin : begin + batch_size]]
        width = max(len(p) for p in batch)
        ids = torch.tensor([p + [0] * (width - len(p)) for p in batch], device=device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in batch], device=device)
        logprobs = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(dim=-1)
        scores = logprobs.gather(2, ids[:, 1:, None])[..., 0] * mask[:, 1:]
        scores.sum().item()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16, help="part 1's requests cycle through these")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(64, 256))
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="HF's batches")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported")
    args = parser.parse_args()

    model = load(args)
    adapters = make_adapters(model, args.adapters)
    requests = workload(args.requests, args.prompt_len, (1, 1), args.adapters, vocab_size=model.config.vocab_size)
    base = [Request(r.prompt, 1, None, 0.0) for r in requests]
    config = EngineConfig(kv_cache_bytes=2**30, max_num_seqs=args.requests, max_batched_tokens=args.max_batched_tokens)
    core = EngineCore(model, config, eos_token_ids=set())
    engine_seconds(core, requests, adapters, scored=True)  # warm up every code path
    plain, scored, scored_base = [], [], []
    for _ in range(args.rounds):
        plain.append(engine_seconds(core, requests, adapters, scored=False))
        scored.append(engine_seconds(core, requests, adapters, scored=True))
        scored_base.append(engine_seconds(core, base, adapters, scored=True))
    del core
    hf = load(args, attention="sdpa")
    hf_seconds(hf, base[: args.batch_size], args.batch_size)
    static = [hf_seconds(hf, base, args.batch_size) for _ in range(args.rounds)]

    tokens = sum(len(r.prompt) - 1 for r in requests)
    rate = {
        name: tokens / statistics.median(times)
        for name, times in (("plain", plain), ("scored", scored), ("scored_base", scored_base), ("hf", static))
    }
    print(f"machine: {machine()}  preset: {args.preset}  {next(model.parameters()).dtype}  {stamp()}")
    print(
        f"{args.requests} prompts of {args.prompt_len[0]}-{args.prompt_len[1]} tokens ({tokens} scored), medians of "
        f"{args.rounds} rounds, in prompt tokens/s"
    )
    print(
        f"[1] {args.adapters} adapters: not scoring {rate['plain']:9.1f}, scoring {rate['scored']:9.1f}  "
        f"ratio scoring/not = {rate['scored'] / rate['plain']:.3f}"
    )
    print(
        f"[2] base model: engine scoring {rate['scored_base']:9.1f}, HF forward in batches of {args.batch_size} "
        f"{rate['hf']:9.1f}  ratio engine/HF = {rate['scored_base'] / rate['hf']:.2f}"
    )


if __name__ == "__main__":
    main()
