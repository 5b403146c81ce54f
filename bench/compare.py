"""Side-by-side benchmarks, measured in one run on one machine, printed as ratios and written to JSON.

1. Adapter overhead: the same requests served with K in {1, 8, 64, 512} distinct adapters vs none.
2. Continuous batching vs HF `generate` with static batches, on the same requests arriving as a
   Poisson process at the engine's capacity.
3. Mixed-batch serving vs the way pyreft users serve today: requests grouped by adapter, each group
   through HF `generate` with that adapter's hooks on the prompt forward, one group after another.
4. Scaling: prefill throughput as adapter rank and the number of intervened layers grow.
5. A real server over HTTP: upload-to-first-token latency of a new adapter, throughput while
   adapters are being uploaded, and TTFT / inter-token latency vs offered load (bench/load.py).
6. Prefix caching: requests sharing a system prompt, with mixed adapters, caching on vs off.

Parts 1-4 and 6 run in-process (one EngineCore per configuration over one model, and a plain HF model for
the baselines). Every configuration runs once per round, round 0 is a discarded warm-up, medians
are reported. Engine configurations compared with each other step in turn (see `lockstep`); their
ratios ([1], [4], [6]) are medians of per-round ratios, as is [5]'s upload ratio; the others are ratios
of medians.

    python bench/compare.py            # the README's figures: about 12 minutes on 2 CPU cores
    python bench/compare.py --quick    # smoke run: about 1 minute
    python bench/compare.py --preset smollm2 --quick --adapters 1 8 64 --skip-scaling --skip-prefix
        # [1], [2], [3] and [5] on the demo's real SmolLM2-135M-Instruct (adapters of its demo recipe's shape)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    Request,
    adapter_shape,
    add_model_arguments,
    dtype_of,
    left_padded,
    load,
    machine,
    make_adapters,
    model_dir,
    stamp,
    workload,
)
from bench.engine_overhead import run_engine, run_static  # noqa: E402
from bench.load import LoadSpec, Planned, describe, plan, run_load, send  # noqa: E402
from server.adapters.random_adapters import random_adapter_file  # noqa: E402
from server.adapters.store import AdapterStore  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.core import EngineCore  # noqa: E402
from server.engine.fused_rotary import transformers_own_rotation  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402
from server.engine.sequence import Sequence  # noqa: E402
from server.reft.adapter import Adapter  # noqa: E402
from server.reft.batch_edit import batch_edit_kwargs  # noqa: E402
from server.reft.hf_cache import cache_argument, returned_cache  # noqa: E402
from server.reft.reference import reference_generate  # noqa: E402
from server.reft.request_edit import request_edit  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

TARGETS = {"overhead_64": 0.97, "grouped_64": 5.0, "continuous": 1.3}


# -- measurement rounds --------------------------------------------------------------------------------
Runner = Callable[[int], dict[str, dict]]  # round index -> results of the configurations it ran


def rounds(runners: list[Runner], count: int, key: str, warm_up: bool = True) -> dict[str, list[dict]]:
    """Run every runner once per round, interleaved (A, B, A, B, ...); round 0 is a discarded warm-up.
    Prints each round's `key` values; returns the per-round results of each configuration."""
    results: dict[str, list[dict]] = {}
    for index in range(0 if warm_up else 1, count + 1):
        line = []
        for runner in runners:
            for name, result in runner(index).items():
                line.append(f"{name} {result[key]:.0f}")
                if index:
                    results.setdefault(name, []).append(result)
        print(f"    {'warm-up' if index == 0 else f'round {index}'}: {'  '.join(line)}", flush=True)
    return results


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def per_round(results: list[dict], key: str) -> list[float]:
    return [round(r[key], 1) for r in results]


def paired(results: dict[str, list[dict]], name: str, reference: str, key: str) -> list[float]:
    """Per-round ratios of two configurations measured side by side in the same rounds."""
    return [a[key] / b[key] for a, b in zip(results[name], results[reference], strict=True)]


# -- the engine ------------------------------------------------------------------------------------------
def assign(requests: list[Request], count: int, round_index: int) -> list[Request]:
    """Request i of round r uses adapter (r * n + i) % count: with more adapters than requests, the
    rounds go through all of them, and within a round every request has its own adapter."""
    n = len(requests)
    return [replace(r, adapter=(round_index * n + i) % count if count else None) for i, r in enumerate(requests)]


def new_core(args, model, prefix_caching: bool = True) -> EngineCore:
    config = EngineConfig(
        kv_cache_bytes=args.kv_cache_bytes,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
        prefix_caching=prefix_caching,
    )
    return EngineCore(model, config, eos_token_ids=set())


def lockstep(runs: dict[str, tuple[EngineCore, list[Request], list[Adapter]]]) -> dict[str, dict]:
    """Serve each configuration's requests (all arriving at once) on its own engine over the one model,
    one step of each engine in turn, and time every engine's own steps.

    A shared host's speed drifts by several percent over seconds; engines stepping in turn see the
    same drift, so ratios between configurations stay precise where back-to-back runs would not.
    """
    elapsed = dict.fromkeys(runs, 0.0)
    generated = dict.fromkeys(runs, 0)
    for name, (core, requests, adapters) in runs.items():
        core.kv.reset_prefix_cache()  # the rounds replay the same prompts: each starts cold
        core.kv.prefix_queries = core.kv.prefix_hits = 0
        started = time.perf_counter()
        for index, r in enumerate(requests):
            sampling = SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True)
            adapter = adapters[r.adapter] if r.adapter is not None else None
            core.add(Sequence(str(index), r.prompt, sampling, request_edit(adapter, len(r.prompt))))
        elapsed[name] += time.perf_counter() - started
    while any(core.has_work() for core, _, _ in runs.values()):
        for name, (core, _, _) in runs.items():
            if core.has_work():
                started = time.perf_counter()
                outputs = core.step()
                elapsed[name] += time.perf_counter() - started
                generated[name] += sum(len(output.new_tokens) for output in outputs)
    results = {}
    for name, (_, requests, _) in runs.items():
        seconds = elapsed[name]
        kv = runs[name][0].kv
        results[name] = {
            "tokens_per_s": generated[name] / seconds,
            "requests_per_s": len(requests) / seconds,
            "prompt_tokens_per_s": sum(len(r.prompt) for r in requests) / seconds,
            "seconds": seconds,
            "prefix_hit_rate": kv.prefix_hits / kv.prefix_queries if kv.prefix_queries else 0.0,
        }
    return results


# -- HF generate baselines -------------------------------------------------------------------------------
@torch.inference_mode()
@transformers_own_rotation()  # baselines run transformers' own code, also after an engine ran in this process
def hf_generate(model, batch: list[Request], adapter: Adapter | None) -> torch.Tensor:
    """Greedy HF `generate` on one left-padded batch, up to its longest request's output length.

    With an adapter, pyreft's semantics (intervene on the prompt only): the prompt forward edits
    the adapter's positions shifted by each row's padding (as the reference does), which builds the KV
    cache; `generate` then decodes from that cache unedited.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = (t.to(device) for t in left_padded(batch))
    max_new_tokens = max(r.max_new_tokens for r in batch)
    options = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if adapter is None:
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **options
        )
    width = input_ids.shape[1]
    shifted = [
        [[p + width - len(r.prompt) for p in positions] for positions in adapter.positions(len(r.prompt))]
        for r in batch
    ]
    prompt = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
        **batch_edit_kwargs(model, adapter.layers, shifted, width),
    )
    first = prompt.logits[:, -1].argmax(-1, keepdim=True)
    return model.generate(
        input_ids=torch.cat([input_ids, first], 1),
        attention_mask=torch.cat([attention_mask, torch.ones_like(first)], 1),
        max_new_tokens=max_new_tokens - 1,
        **{cache_argument(model): returned_cache(prompt)},
        **options,
    )


def hf_calls(requests: list[Request], batch_size: int) -> list[list[Request]]:
    """The generate calls of a baseline: requests grouped by adapter (base-model requests form one
    group) in order of first appearance, each group cut into batches of at most `batch_size`."""
    groups: dict[int | None, list[Request]] = {}
    for r in requests:
        groups.setdefault(r.adapter, []).append(r)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def window(calls: list[list[Request]], sample: int, index: int) -> list[list[Request]]:
    """The `index`-th run (cycling) of consecutive calls holding at least `sample` requests.

    The baselines run their calls one after another, so a window's throughput estimates the whole
    run's; rotating windows over the rounds covers different groups each round."""
    windows: list[list[list[Request]]] = [[]]
    for call in calls:
        if sum(map(len, windows[-1])) >= sample:
            windows.append([])
        windows[-1].append(call)
    return windows[index % len(windows)]


def hf_run(model, calls: list[list[Request]], adapters: list[Adapter]) -> dict:
    start = time.perf_counter()
    for call in calls:
        hf_generate(model, call, adapters[call[0].adapter] if call[0].adapter is not None else None)
    elapsed = time.perf_counter() - start
    requests = sum(map(len, calls))
    tokens = sum(r.max_new_tokens for call in calls for r in call)  # tokens past a request's own limit are waste
    return {
        "tokens_per_s": tokens / elapsed,
        "requests_per_s": requests / elapsed,
        "seconds": elapsed,
        "requests": requests,
    }


def check_baseline(model, adapter: Adapter) -> None:
    """The grouped baseline must generate what the reference does (left padding included)."""
    batch = [replace(r, adapter=0) for r in workload(3, (20, 60), (8, 16), 0, seed=7)]
    generated = hf_generate(model, batch, adapter)[:, max(len(r.prompt) for r in batch) :]
    for row, r in enumerate(batch):
        expected = reference_generate(model, r.prompt, adapter, max_new_tokens=r.max_new_tokens)
        if generated[row, : r.max_new_tokens].tolist() != expected:
            raise RuntimeError("the grouped-by-adapter baseline does not reproduce the reference generator")


# -- parts 1 to 4 ----------------------------------------------------------------------------------------
def adapters_and_baselines(args, model, hf, requests, adapters) -> tuple[dict, EngineCore]:
    """Parts 1 and 3 in the same rounds: the engine with no adapters and with K (in lockstep), then
    HF generate (static batches on the base model; grouped by adapter with hooks). Returns the results
    and the base configuration's engine, warm, for part 2."""
    cores = {"ours K=0": new_core(args, model)} | {f"ours K={k}": new_core(args, model) for k in args.adapters}

    def engines(r: int) -> dict[str, dict]:
        counts = {"ours K=0": 0} | {f"ours K={k}": k for k in args.adapters}
        return lockstep({name: (core, assign(requests, counts[name], r), adapters) for name, core in cores.items()})

    static_calls = hf_calls(requests, args.static_batch)
    runners: list[Runner] = [
        engines,
        lambda r: {"HF static": hf_run(hf, window(static_calls, args.baseline_sample, r), adapters)},
    ]

    def grouped(k: int) -> Runner:
        def run(r: int) -> dict[str, dict]:
            calls = hf_calls(assign(requests, k, r), args.static_batch)
            return {f"grouped K={k}": hf_run(hf, window(calls, args.baseline_sample, r), adapters)}

        return run

    runners += [grouped(k) for k in args.adapters]
    print(
        f"[1+3] {len(requests)} requests at once; ours = the engine, one per configuration, stepping in turn; "
        f"HF = generate, batches of <= {args.static_batch}, a window of >= {args.baseline_sample} requests per round "
        "(output tok/s)",
        flush=True,
    )
    measured = rounds(runners, args.rounds, "tokens_per_s")
    base = median(measured["ours K=0"], "tokens_per_s")
    out = {
        "ours_base": {"tokens_per_s": base, "rounds": per_round(measured["ours K=0"], "tokens_per_s")},
        "hf_static": {
            "tokens_per_s": median(measured["HF static"], "tokens_per_s"),
            "rounds": per_round(measured["HF static"], "tokens_per_s"),
        },
        "per_k": {},
    }
    for k in args.adapters:
        ours, grouped = measured[f"ours K={k}"], measured[f"grouped K={k}"]
        overhead = paired(measured, f"ours K={k}", "ours K=0", "tokens_per_s")
        out["per_k"][str(k)] = {
            "ours_tokens_per_s": median(ours, "tokens_per_s"),
            "ours_rounds": per_round(ours, "tokens_per_s"),
            "ours_requests_per_s": median(ours, "requests_per_s"),
            "overhead_ratio": statistics.median(overhead),  # paired: each round's K-adapter run over its base run
            "overhead_rounds": [round(x, 3) for x in overhead],
            "grouped_tokens_per_s": median(grouped, "tokens_per_s"),
            "grouped_rounds": per_round(grouped, "tokens_per_s"),
            "grouped_requests_per_round": [r["requests"] for r in grouped],
            "mixed_over_grouped": median(ours, "tokens_per_s") / median(grouped, "tokens_per_s"),
        }
    return out, cores["ours K=0"]


def poisson(args, core, hf, rate: float) -> dict:
    """Part 2: the same Poisson arrivals served by the engine and by HF static batches (base model).
    Parts 1 and 3 warmed both up (same engine, same HF model), so every round here is measured."""
    arrivals = workload(args.requests, args.prompt_len, args.output_len, 0, rate=rate, seed=1)
    print(
        f"[2] {len(arrivals)} requests, Poisson at {rate:.2f}/s; HF static batches of <= {args.static_batch}",
        flush=True,
    )
    runners: list[Runner] = [
        lambda r: {"ours": run_engine(core, arrivals, [], realtime=True)},
        lambda r: {"HF static": run_static(hf, arrivals, args.static_batch)},
    ]
    measured = rounds(runners, args.rounds, "tokens_per_s", warm_up=False)
    out = {"rate": rate}
    for name, key in (("ours", "ours"), ("HF static", "static")):
        out[f"{key}_tokens_per_s"] = median(measured[name], "tokens_per_s")
        out[f"{key}_p90_ttft_s"] = median(measured[name], "p90_ttft")
        out[f"{key}_rounds"] = per_round(measured[name], "tokens_per_s")
        out[f"{key}_p90_ttft_rounds"] = [round(r["p90_ttft"], 3) for r in measured[name]]
    out["ratio"] = out["ours_tokens_per_s"] / out["static_tokens_per_s"]
    return out


def scaling(args, model, requests) -> dict:
    """Part 4: prefill only (one output token each), the one phase adapters cost anything in; every
    variant on its own engine, in lockstep with the base model's."""
    prefill = [replace(r, max_new_tokens=1) for r in requests[: args.scaling_requests]]
    count = min(64, len(prefill))
    num_layers = model.config.num_hidden_layers
    layer_sets = [(num_layers // 2,), tuple(range(0, num_layers, 2)), tuple(range(num_layers))]

    def label(rank: int, layers: tuple[int, ...]) -> str:
        return f"rank {rank}, {len(layers)} layer{'s' if len(layers) > 1 else ''}"

    variants = {label(rank, layer_sets[1]): (rank, layer_sets[1]) for rank in args.ranks}
    variants.update({label(4, layers): (4, layers) for layers in layer_sets})
    sets = {name: make_adapters(model, count, rank=rank, layers=layers) for name, (rank, layers) in variants.items()}
    cores = {name: new_core(args, model) for name in ["base", *variants]}

    def engines(r: int) -> dict[str, dict]:
        runs = {"base": (cores["base"], prefill, [])}
        runs |= {name: (cores[name], assign(prefill, count, r), sets[name]) for name in variants}
        return lockstep(runs)

    print(f"[4] prefill only: {len(prefill)} prompts, {count} adapters (prompt tok/s)", flush=True)
    measured = rounds([engines], args.rounds, "prompt_tokens_per_s")
    base = median(measured["base"], "prompt_tokens_per_s")
    out = {"base_prompt_tokens_per_s": base, "base_rounds": per_round(measured["base"], "prompt_tokens_per_s")}
    out["variants"] = {}
    for name, (rank, layers) in variants.items():
        ratios = paired(measured, name, "base", "prompt_tokens_per_s")
        out["variants"][name] = {
            "rank": rank,
            "layers": list(layers),
            "prompt_tokens_per_s": median(measured[name], "prompt_tokens_per_s"),
            "rounds": per_round(measured[name], "prompt_tokens_per_s"),
            "ratio": statistics.median(ratios),
            "ratio_rounds": [round(x, 3) for x in ratios],
        }
    return out


def shared_prefix(args, model, adapters) -> dict:
    """Part 6: every request starts with one system prompt, then its own message; 8 adapters and
    some base-model requests. Prefix caching on vs off, engines in lockstep, each round cold."""
    (system,) = workload(1, (args.system_len, args.system_len), (1, 1), 0, seed=3)
    messages = workload(args.requests, (16, 48), args.output_len, 8, base_share=0.1, seed=4)
    requests = [replace(r, prompt=system.prompt + r.prompt[1:]) for r in messages]
    cores = {"caching on": new_core(args, model), "caching off": new_core(args, model, prefix_caching=False)}

    def engines(r: int) -> dict[str, dict]:
        return lockstep({name: (core, requests, adapters) for name, core in cores.items()})

    print(
        f"[6] {len(requests)} requests sharing a {args.system_len}-token system prompt + 16-48 tokens each, "
        "8 adapters and 10% base, all at once; prefix caching on vs off (output tok/s)",
        flush=True,
    )
    measured = rounds([engines], args.rounds, "tokens_per_s")
    ratios = paired(measured, "caching on", "caching off", "tokens_per_s")
    return {
        "system_len": args.system_len,
        "on_tokens_per_s": median(measured["caching on"], "tokens_per_s"),
        "off_tokens_per_s": median(measured["caching off"], "tokens_per_s"),
        "on_rounds": per_round(measured["caching on"], "tokens_per_s"),
        "off_rounds": per_round(measured["caching off"], "tokens_per_s"),
        "hit_rate": median(measured["caching on"], "prefix_hit_rate"),
        "ratio": statistics.median(ratios),
        "ratio_rounds": [round(x, 3) for x in ratios],
    }


# -- part 5: a real server -------------------------------------------------------------------------------
async def hot_loads(url: str, auth: dict, payloads: list[bytes], prompts: list[list[int]]) -> dict:
    """Upload a new adapter, then request it at once: upload start -> first streamed token. Then the
    TTFT of a second request for it, now resident, with another prompt of the same length (the first
    prompt's prefix is cached by then)."""
    cold_prompt, warm_prompt = prompts
    runs = []
    async with httpx.AsyncClient(timeout=60) as client:
        for i, payload in enumerate(payloads):
            name = f"hot{i}"
            origin = time.perf_counter()
            response = await client.post(
                f"{url}/v1/adapters/{name}", headers=auth, files={"file": (f"{name}.safetensors", payload)}
            )
            response.raise_for_status()
            cold = await send(client, url, Planned(i, cold_prompt, 4, name, 0.0), origin)
            warm = await send(client, url, Planned(i, warm_prompt, 4, name, 0.0), time.perf_counter())
            if cold.error or warm.error:
                raise RuntimeError(f"hot-load request failed: {cold.error or warm.error}")
            runs.append(
                {
                    "upload_s": cold.start,
                    "first_token_s": cold.ttft,
                    "total_s": cold.start + cold.ttft,
                    "warm_ttft_s": warm.ttft,
                }
            )
            await asyncio.sleep(0.2)
    return {
        "runs": runs,
        **{f"median_{key}": statistics.median(r[key] for r in runs) for key in runs[0]},
    }


async def uploader(
    url: str, auth: dict, names: list[str], payloads: list[bytes], every: float, log: list[float]
) -> None:
    """Publish a new version of the workload's adapters, one name after another, every `every` s:
    requests for that name then load the new version (a registry miss), as in a live hot swap."""
    async with httpx.AsyncClient(timeout=60) as client:
        for i in itertools.count():
            started = time.perf_counter()
            name = names[i % len(names)]
            response = await client.post(
                f"{url}/v1/adapters/{name}",
                headers=auth,
                files={"file": (f"{name}.safetensors", payloads[i % len(payloads)])},
            )
            response.raise_for_status()
            log.append(time.perf_counter() - started)
            await asyncio.sleep(max(0.0, every - (time.perf_counter() - started)))


async def with_uploads(url: str, spec: LoadSpec, auth: dict, names, payloads, every: float) -> dict:
    log: list[float] = []
    task = asyncio.create_task(uploader(url, auth, names, payloads, every, log))
    try:
        summary = await run_load(url, spec)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return {**summary, "uploads": len(log), "upload_median_s": statistics.median(log) if log else None}


async def server_part(args, url: str, auth: dict, names: list[str], payloads: dict[str, list[bytes]]) -> dict:
    mix = dict(adapters=tuple(names), zipf=args.zipf, base_share=args.base_share)
    lengths = dict(prompt_len=tuple(args.prompt_len), output_len=tuple(args.output_len))
    prompts = [planned.prompt for planned in plan(LoadSpec(requests=2, prompt_len=(64, 64)))]
    prompt = prompts[0]
    async with httpx.AsyncClient(timeout=120) as client:  # every adapter resident: what follows measures uploads
        warm = [
            send(client, url, Planned(i, prompt, 1, name, 0.0), time.perf_counter()) for i, name in enumerate(names)
        ]
        if failed := [o.error for o in await asyncio.gather(*warm) if o.error]:
            raise RuntimeError(f"loading the adapters failed: {failed[0]}")
    print("[5] a real server over HTTP (bench/load.py), streaming /v1/generate", flush=True)
    hot = await hot_loads(url, auth, payloads["hot"], prompts)
    print(
        f"    upload-to-first-token, rank 8, median of {len(hot['runs'])}: {hot['median_total_s'] * 1000:.0f} ms "
        f"(upload {hot['median_upload_s'] * 1000:.0f} ms + first token {hot['median_first_token_s'] * 1000:.0f} ms; "
        f"a resident adapter's TTFT {hot['median_warm_ttft_s'] * 1000:.0f} ms)  runs "
        f"{[round(r['total_s'] * 1000) for r in hot['runs']]} ms",
        flush=True,
    )
    spec = LoadSpec(requests=args.server_requests, concurrency=args.concurrency, deadline=300, **lengths, **mix)
    print(
        f"    closed loop, {args.concurrency} clients, {spec.requests} requests, {len(names)} adapters "
        f"(Zipf {args.zipf}, {args.base_share:.0%} base); with = a new version every {args.upload_every} s "
        "(output tok/s)",
        flush=True,
    )
    results: dict[str, list[dict]] = {"without": [], "with": []}
    for index in range(args.rounds + 1):
        # every run draws its own prompts, so none reuses another's prefixes from the server's cache
        plain, uploading = replace(spec, seed=2 * index), replace(spec, seed=2 * index + 1)
        if index % 2:  # the order alternates (A B, B A, ...), so a slow drift of the machine's speed cancels
            with_ = await with_uploads(url, uploading, auth, names, payloads["versions"], args.upload_every)
            without = await run_load(url, plain)
        else:
            without = await run_load(url, plain)
            with_ = await with_uploads(url, uploading, auth, names, payloads["versions"], args.upload_every)
        print(
            f"    {'warm-up' if index == 0 else f'round {index}'}: without {without['output_tokens_per_s']:.0f}  "
            f"with {with_['output_tokens_per_s']:.0f} ({with_['uploads']} uploads)",
            flush=True,
        )
        if index:
            results["without"].append(without)
            results["with"].append(with_)
    uploads = {
        "without_tokens_per_s": median(results["without"], "output_tokens_per_s"),
        "with_tokens_per_s": median(results["with"], "output_tokens_per_s"),
        "without_rounds": per_round(results["without"], "output_tokens_per_s"),
        "with_rounds": per_round(results["with"], "output_tokens_per_s"),
        "uploads_per_round": [r["uploads"] for r in results["with"]],
        "errors": sum(r["errors"] for rs in results.values() for r in rs),
        "runs": results,
    }
    ratios = paired(results, "with", "without", "output_tokens_per_s")  # each round's two runs are neighbours
    uploads.update(ratio=statistics.median(ratios), ratio_rounds=[round(x, 3) for x in ratios])
    capacity = median(results["without"], "requests_per_s")
    curve = []
    for point, fraction in enumerate(args.load_fractions):
        rate = fraction * capacity
        count = max(16, round(rate * args.load_seconds))
        summary = await run_load(url, replace(spec, rate=rate, requests=count, seed=100 + point))
        print(f"    Poisson {rate:5.2f}/s ({fraction:.0%} of {capacity:.2f}/s): {describe(summary)}", flush=True)
        curve.append({"fraction": fraction, "rate": rate, **summary})
    return {"hot_load": hot, "uploads": uploads, "capacity_requests_per_s": capacity, "latency_vs_load": curve}


def run_server_part(args, hidden_size: int, layers: tuple[int, ...], positions: str) -> dict:
    def payload(rank: int, seed: int) -> bytes:
        return random_adapter_file("loreft", layers, rank, positions, hidden_size, seed=seed, scale=0.05).to_bytes()

    names = [f"a{i}" for i in range(args.server_adapters)]
    payloads = {
        "hot": [payload(8, 10_000 + i) for i in range(args.hot_loads)],
        "versions": [payload(4, 20_000 + i) for i in range(32)],
    }
    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="reft-bench-") as tmp:
        store = AdapterStore(Path(tmp) / "store")
        for i, name in enumerate(names):
            store.publish(name, payload(4, i))
        server = ServerProcess(
            Path(tmp) / "server.log",
            *("--model", str(model_dir(args)), "--device", args.device, "--dtype", str(dtype_of(args)).split(".")[-1]),
            *("--store", str(store.root), "--admin-token", token, "--threads", str(args.threads)),
            *("--max-num-seqs", str(args.max_num_seqs), "--max-batched-tokens", str(args.max_batched_tokens)),
            *("--kv-cache-memory", str(args.kv_cache_bytes), "--log-level", "warning"),
        )
        with server:
            return asyncio.run(server_part(args, server.url, {"Authorization": f"Bearer {token}"}, names, payloads))


# -- main ------------------------------------------------------------------------------------------------
def ratio_line(
    label: str,
    numerator: float,
    denominator: float,
    unit: str,
    paired_rounds: list[float] | None = None,
    target: float | None = None,
) -> str:
    """`numerator / denominator = ratio`; with `paired_rounds` the ratio is their median (printed too)."""
    ratio = statistics.median(paired_rounds) if paired_rounds else numerator / denominator
    text = f"  {label:<40} {numerator:8.1f} / {denominator:8.1f} {unit} = {ratio:6.3f}"
    if paired_rounds:
        text += f"   rounds {' '.join(f'{x:.3f}' for x in paired_rounds)}"
    return text + (f"   (target >= {target})" if target else "")


def report(results: dict) -> None:
    """Every ratio once more, in one block: the README's table."""
    a, p = results["adapters"], results["poisson"]
    base = a["ours_base"]["tokens_per_s"]
    print("\nsummary: all measured in this run; ratios with rounds are medians of per-round ratios")
    for k, row in a["per_k"].items():
        label, target = f"[1] ours K={k} / ours base-only", TARGETS["overhead_64"] if k == "64" else None
        print(ratio_line(label, row["ours_tokens_per_s"], base, "tok/s", row["overhead_rounds"], target))
    print(ratio_line("[2] ours / HF static, Poisson", p["ours_tokens_per_s"], p["static_tokens_per_s"], "tok/s"))
    print(
        f"  {'    p90 TTFT ours vs HF static':<40} {p['ours_p90_ttft_s']:8.2f} vs {p['static_p90_ttft_s']:8.2f} s"
        f"   (target >= {TARGETS['continuous']}x throughput at <= p90 TTFT)"
    )
    for k, row in a["per_k"].items():
        label, target = f"[3] ours K={k} / HF grouped by adapter", TARGETS["grouped_64"] if k == "64" else None
        print(ratio_line(label, row["ours_tokens_per_s"], row["grouped_tokens_per_s"], "tok/s", target=target))
    print(ratio_line("[3] ours base-only / HF static, at once", base, a["hf_static"]["tokens_per_s"], "tok/s"))
    if "scaling" in results:
        s = results["scaling"]
        for name, row in s["variants"].items():
            label, base_prefill = f"[4] {name} / base, prefill", s["base_prompt_tokens_per_s"]
            print(ratio_line(label, row["prompt_tokens_per_s"], base_prefill, "tok/s", row["ratio_rounds"]))
    if "prefix" in results:
        shared = results["prefix"]
        label = f"[6] prefix caching on / off ({shared['hit_rate']:.0%} hit)"
        print(ratio_line(label, shared["on_tokens_per_s"], shared["off_tokens_per_s"], "tok/s", shared["ratio_rounds"]))
    if "server" in results:
        hot, up = results["server"]["hot_load"], results["server"]["uploads"]
        print(
            f"  {'[5] upload-to-first-token, rank 8':<40} {hot['median_total_s'] * 1000:8.0f} ms"
            f"   (median of {len(hot['runs'])}; a resident adapter's TTFT {hot['median_warm_ttft_s'] * 1000:.0f} ms)"
        )
        label = "[5] with uploads / without"
        print(ratio_line(label, up["with_tokens_per_s"], up["without_tokens_per_s"], "tok/s", up["ratio_rounds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(threads=1)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small workloads, one round")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 128))
    parser.add_argument("--output-len", type=int, nargs=2, default=(32, 128))
    parser.add_argument("--adapters", type=int, nargs="+", default=(1, 8, 64, 512), help="values of K")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after the warm-up; medians reported")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-cache-bytes", type=int, default=512 * 2**20)
    parser.add_argument("--static-batch", type=int, default=32, help="batch size of the HF baselines")
    parser.add_argument("--baseline-sample", type=int, default=8, help="requests per HF baseline round, at least")
    parser.add_argument("--ranks", type=int, nargs="+", default=(1, 4, 16, 64))
    parser.add_argument("--scaling-requests", type=int, default=32)
    parser.add_argument("--system-len", type=int, default=256, help="system prompt tokens of part 6")
    parser.add_argument("--skip-scaling", action="store_true", help="leave out [4]")
    parser.add_argument("--skip-prefix", action="store_true", help="leave out [6]")
    parser.add_argument("--skip-server", action="store_true", help="leave out [5]")
    parser.add_argument("--server-adapters", type=int, default=64)
    parser.add_argument("--server-requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--base-share", type=float, default=0.1)
    parser.add_argument("--upload-every", type=float, default=0.5)
    parser.add_argument("--hot-loads", type=int, default=7)
    parser.add_argument("--load-fractions", type=float, nargs="+", default=(0.25, 0.5, 0.75, 1.0, 1.25))
    parser.add_argument("--load-seconds", type=float, default=8.0, help="Poisson requests = rate x this")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/compare[-quick].json")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.baseline_sample, args.scaling_requests = 16, 1, 4, 16
        args.prompt_len, args.output_len = (16, 64), (8, 32)
        args.server_requests, args.concurrency, args.hot_loads, args.load_seconds = 16, 8, 3, 4.0
        args.load_fractions = (0.5, 1.0)
        args.system_len = 64
    out = args.out or Path(__file__).parent / "results" / ("compare-quick.json" if args.quick else "compare.json")
    started = time.perf_counter()

    model = load(args)
    hf = load(args, attention="sdpa")
    layers, rank, positions = adapter_shape(args, model)
    adapters = make_adapters(model, max(args.adapters), rank=rank, layers=layers, positions=positions)
    check_baseline(hf, adapters[0])
    requests = workload(args.requests, args.prompt_len, args.output_len, 0)
    results = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "date": stamp(),
        "preset": args.preset,
        "dtype": str(dtype_of(args)),
        "settings": {k: v for k, v in vars(args).items() if k not in ("cache", "out")},
    }
    print(f"machine: {results['machine']}  preset: {args.preset}  {results['dtype']}  {results['date']}")
    print(
        f"workload: {args.requests} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, outputs "
        f"{args.output_len[0]}-{args.output_len[1]} tokens (uniform), greedy; engine: max {args.max_num_seqs} "
        f"sequences, {args.max_batched_tokens} tokens per step; medians of {args.rounds} rounds after a warm-up",
        flush=True,
    )
    results["adapters"], core = adapters_and_baselines(args, model, hf, requests, adapters)
    capacity = results["adapters"]["ours_base"]["tokens_per_s"] / statistics.mean(args.output_len)
    results["poisson"] = poisson(args, core, hf, capacity)
    if not args.skip_scaling:
        results["scaling"] = scaling(args, model, requests)
    if not args.skip_prefix:
        results["prefix"] = shared_prefix(args, model, adapters)
    hidden_size = model.config.hidden_size
    del core, model, hf, adapters
    if not args.skip_server:
        results["server"] = run_server_part(args, hidden_size, layers, positions)
    results["seconds"] = time.perf_counter() - started
    report(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out} ({results['seconds'] / 60:.1f} min)")
    try:
        from bench.plots import write_plots  # here: matplotlib is the optional `bench` extra, needed only now
    except ModuleNotFoundError as e:
        print(f"no plots: {e} (pip install -e '.[bench]')")
        return
    for path in write_plots(results, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
