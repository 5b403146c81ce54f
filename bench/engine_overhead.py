"""Engine benchmark, measured in one run on one machine, printed as ratios.

1. Adapter overhead: the same requests served with K distinct adapters vs with none (all arrive at
   once: pure throughput). Target: mixed >= 0.97x base-only.
2. Continuous batching vs HF `generate` with static batches on the same requests arriving as a
   Poisson process. Target: >= 1.3x throughput at equal or better p90 time to first token.

    python bench/engine_overhead.py --preset small --requests 128 --adapters 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    Request,
    add_model_arguments,
    left_padded,
    load,
    machine,
    make_adapters,
    stamp,
    workload,
)
from bench.load import percentile  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.core import EngineCore  # noqa: E402
from server.engine.fused_rotary import transformers_own_rotation  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402
from server.engine.sequence import Sequence  # noqa: E402
from server.reft.request_edit import request_edit  # noqa: E402


def summary(generated: int, elapsed: float, ttft: list[float]) -> dict:
    return {
        "tokens_per_s": generated / elapsed,
        "seconds": elapsed,
        "tokens": generated,
        "p90_ttft": percentile(ttft, 0.9),
    }


def run_engine(core: EngineCore, requests: list[Request], adapters, realtime: bool) -> dict:
    """Serve `requests`; with `realtime` each joins at its arrival time. Returns throughput and TTFTs.
    Every run starts with an empty prefix cache: the rounds replay the same prompts."""
    core.kv.reset_prefix_cache()
    pending = sorted(enumerate(requests), key=lambda item: item[1].arrival)
    first_token: dict[str, float] = {}
    generated = 0
    start = time.perf_counter()
    while pending or core.has_work():
        now = time.perf_counter() - start
        while pending and (not realtime or pending[0][1].arrival <= now):
            index, request = pending.pop(0)
            sampling = SamplingParams(max_new_tokens=request.max_new_tokens, ignore_eos=True)
            adapter = adapters[request.adapter] if request.adapter is not None else None
            core.add(Sequence(str(index), request.prompt, sampling, request_edit(adapter, len(request.prompt))))
        if not core.has_work():
            time.sleep(max(0.0, pending[0][1].arrival - now))
            continue
        for output in core.step():
            generated += len(output.new_tokens)
            if output.request_id not in first_token and output.new_tokens:
                first_token[output.request_id] = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    return summary(generated, elapsed, [first_token[str(i)] - r.arrival for i, r in enumerate(requests)])


class _FirstToken:
    """A generate() streamer that records when the first new token of a batch appears."""

    def __init__(self):
        self.calls = 0
        self.at: float | None = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.at is None:  # call 1 is the prompt, call 2 the first new token
            self.at = time.perf_counter()

    def end(self):
        pass


@torch.inference_mode()
@transformers_own_rotation()  # baselines run transformers' own code, also after an engine ran in this process
def run_static(model, requests: list[Request], batch_size: int) -> dict:
    """HF generate on batches formed in arrival order; a batch starts when it is full (or the last
    request arrived) and the previous batch finished: static batching as users run it."""
    device = next(model.parameters()).device
    ordered = sorted(requests, key=lambda r: r.arrival)
    start = time.perf_counter()
    generated = 0
    ttft = []
    for i in range(0, len(ordered), batch_size):
        batch = ordered[i : i + batch_size]
        wait = batch[-1].arrival - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        input_ids, attention_mask = left_padded(batch)
        streamer = _FirstToken()
        model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max(r.max_new_tokens for r in batch),
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            streamer=streamer,
        )
        generated += sum(r.max_new_tokens for r in batch)  # tokens past a request's own limit are waste
        ttft += [streamer.at - start - r.arrival for r in batch]
    return summary(generated, time.perf_counter() - start, ttft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 256))
    parser.add_argument("--output-len", type=int, nargs=2, default=(32, 128))
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="alternating base/mixed rounds; medians reported")
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals/s for part 2 (default: auto)")
    parser.add_argument("--static-batch", type=int, default=8)
    parser.add_argument("--skip-static", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    model = load(args)
    adapters = make_adapters(model, args.adapters)
    config = EngineConfig(
        kv_cache_bytes=2**30, max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens
    )
    core = EngineCore(model, config, eos_token_ids=set())
    base_load = workload(args.requests, args.prompt_len, args.output_len, 0)
    mixed_load = [Request(r.prompt, r.max_new_tokens, i % args.adapters, 0.0) for i, r in enumerate(base_load)]
    run_engine(core, mixed_load, adapters, realtime=False)  # warm up: allocator, caches, every code path
    base, mixed = [], []
    for _ in range(args.rounds):
        base.append(run_engine(core, base_load, adapters, realtime=False)["tokens_per_s"])
        mixed.append(run_engine(core, mixed_load, adapters, realtime=False)["tokens_per_s"])
    results = {
        "machine": machine(),
        "date": stamp(),
        "preset": args.preset,
        "dtype": str(next(model.parameters()).dtype),
        "requests": args.requests,
        "adapters": args.adapters,
        "base_tokens_per_s": statistics.median(base),
        "mixed_tokens_per_s": statistics.median(mixed),
    }
    results["mixed_over_base"] = results["mixed_tokens_per_s"] / results["base_tokens_per_s"]
    print(f"machine: {results['machine']}  preset: {args.preset}  {results['dtype']}  {results['date']}")
    print(f"[1] {args.requests} requests at once; base-only vs {args.adapters} adapters (median of {args.rounds})")
    print(f"    base-only   {results['base_tokens_per_s']:9.1f} tok/s   rounds {[round(x) for x in base]}")
    print(f"    mixed       {results['mixed_tokens_per_s']:9.1f} tok/s   rounds {[round(x) for x in mixed]}")
    print(f"    ratio mixed/base = {results['mixed_over_base']:.3f}   (target >= 0.97)")

    if not args.skip_static:
        # arrivals at the base engine's capacity: both systems stay busy, neither idles for long
        rate = args.rate or results["base_tokens_per_s"] / statistics.mean(args.output_len)
        arrivals = workload(args.requests, args.prompt_len, args.output_len, 0, rate=rate, seed=1)
        engine = run_engine(core, arrivals, adapters, realtime=True)
        del core
        hf = load(args, attention="sdpa")
        static = run_static(hf, arrivals, args.static_batch)
        results.update(
            rate=rate,
            engine_tokens_per_s=engine["tokens_per_s"],
            static_tokens_per_s=static["tokens_per_s"],
            engine_p90_ttft=engine["p90_ttft"],
            static_p90_ttft=static["p90_ttft"],
            engine_over_static=engine["tokens_per_s"] / static["tokens_per_s"],
        )
        print(
            f"[2] {args.requests} requests, Poisson at {rate:.2f}/s; HF generate, static batches of {args.static_batch}"
        )
        print(f"    engine      {engine['tokens_per_s']:9.1f} tok/s   p90 TTFT {engine['p90_ttft']:.3f} s")
        print(f"    HF static   {static['tokens_per_s']:9.1f} tok/s   p90 TTFT {static['p90_ttft']:.3f} s")
        print(f"    ratio engine/static = {results['engine_over_static']:.2f}   (target >= 1.3 at <= p90 TTFT)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
