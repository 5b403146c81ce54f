"""Over HTTP, the same load against the engine core in a thread and in a process of its own
(`--engine-core thread|process`): a fresh `reft-server serve` per run, the two kinds alternating
round by round, medians reported with the process ÷ thread ratios.

    python bench/engine_core_ab.py --preset small --rounds 2 --out bench/results/engine_core_ab.json
    python bench/engine_core_ab.py --model /models/x --device cuda --dtype bfloat16 --concurrency 128

Without --model it builds `--preset`'s random-init model; either way it publishes `--adapters` random
LoReFT adapters to a fresh store, and the load mixes them (Zipf) with base-model requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from bench.common import PRESETS, save_preset_model  # noqa: E402
from bench.load import LoadSpec, run_load  # noqa: E402
from server.adapters.random_adapters import random_adapter_file  # noqa: E402
from server.adapters.store import AdapterStore  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

KINDS = ("thread", "process")
REPORTED = ("output_tokens_per_s", "ttft_p50_s", "ttft_p90_s", "itl_p50_s")


def publish_adapters(model: Path, store: Path, count: int) -> list[str]:
    config = AutoConfig.from_pretrained(model)
    layers = tuple(range(0, config.num_hidden_layers, 2))
    adapters = AdapterStore(store)
    for i in range(count):
        adapter = random_adapter_file("loreft", layers, 4, "f7+l7", config.hidden_size, seed=i, scale=0.05)
        adapters.publish(f"a{i}", adapter.to_bytes())
    return [f"a{i}" for i in range(count)]


def figures(summary: dict) -> dict:
    return {
        "output_tokens_per_s": summary["output_tokens_per_s"],
        "ttft_p50_s": summary["ttft_s"]["p50"],
        "ttft_p90_s": summary["ttft_s"]["p90"],
        "itl_p50_s": summary["itl_s"]["p50"],
        "errors": summary["errors"],
    }


def serve_and_load(kind: str, args, model: Path, store: Path, spec: LoadSpec, log: Path) -> dict:
    server_args = ["--model", str(model), "--store", str(store), "--engine-core", kind, "--admin-open"]
    server_args += ["--device", args.device, "--dtype", args.dtype, "--kv-cache-memory", args.kv_cache_memory]
    server_args += ["--max-num-seqs", str(args.max_num_seqs), "--max-batched-tokens", str(args.max_batched_tokens)]
    env = {"REFT_THREADS": str(args.threads)} if args.threads else {}
    server = ServerProcess(log, *server_args, env=env, startup_timeout=600)
    try:
        warm = LoadSpec(**{**spec.__dict__, "requests": max(8, spec.concurrency // 2), "seed": 99})
        asyncio.run(run_load(server.url, warm))  # untimed: first loads of adapters, allocator warm-up
        return figures(asyncio.run(run_load(server.url, spec)))
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: build --preset)")
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (0 = torch's choice)")
    parser.add_argument("--kv-cache-memory", default="512MiB")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 128))
    parser.add_argument("--output-len", type=int, nargs=2, default=(64, 64))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="engine-core-ab-"))
    model = args.model or save_preset_model(args.preset, work / "model", "cpu", torch.float32)
    names = publish_adapters(model, work / "store", args.adapters)
    spec = LoadSpec(
        requests=args.requests,
        concurrency=args.concurrency,
        prompt_len=tuple(args.prompt_len),
        output_len=tuple(args.output_len),
        adapters=tuple(names),
        zipf=1.1,
        base_share=0.1,
        deadline=1800,
    )
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for round_index in range(args.rounds):
        for kind in KINDS if round_index % 2 == 0 else KINDS[::-1]:
            result = serve_and_load(kind, args, model, work / "store", spec, work / f"server-{kind}-{round_index}.log")
            runs[kind].append(result)
            print(f"round {round_index + 1} {kind:>7}: " + json.dumps(result), flush=True)
    medians = {kind: {key: statistics.median(r[key] for r in runs[kind]) for key in REPORTED} for kind in KINDS}
    ratios = {key: medians["process"][key] / medians["thread"][key] for key in REPORTED}
    print("medians: " + json.dumps(medians))
    print("process ÷ thread: " + json.dumps({key: round(value, 3) for key, value in ratios.items()}))
    if args.out:
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        result = {"settings": settings, "runs": runs, "medians": medians, "ratios": ratios}
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
