"""One GPU vs a tensor-parallel group of N on the same model: engine throughput with adapters.

The same requests (all at once, a share on the base model, the rest over K adapters) run first on
one device in this process, then on a group of N: this process becomes rank 0 and spawns ranks
1..N-1, exactly as `reft-server serve --tensor-parallel N` does. Rounds alternate; medians reported.

    python bench/tensor_parallel.py --preset 1b --tensor-parallel 2 --requests 256 --adapters 64

On GPUs each rank takes one (rank r: cuda:r), joined by NCCL. On CPU it runs over gloo, which
shows that the path works, not what it gains: the ranks share one machine's cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_arguments, dtype_of, load, machine, make_adapters, model_dir, stamp, workload  # noqa: E402
from bench.engine_overhead import run_engine  # noqa: E402
from server.config import Settings  # noqa: E402
from server.distributed.adapter_mirror import AdapterSender  # noqa: E402
from server.distributed.launch import spawn_group  # noqa: E402
from server.distributed.runner import TensorParallelDriver  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.core import EngineCore  # noqa: E402
from server.models.loader import load_model  # noqa: E402


def rounds(core: EngineCore, requests, adapters, count: int) -> list[float]:
    run_engine(core, requests, adapters, realtime=False)  # warm-up
    return [run_engine(core, requests, adapters, realtime=False)["tokens_per_s"] for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tensor-parallel", type=int, default=2)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 256))
    parser.add_argument("--output-len", type=int, nargs=2, default=(32, 128))
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=1024)
    parser.add_argument("--kv-cache-memory", type=int, default=2 * 2**30, help="bytes per rank")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    config = EngineConfig(
        kv_cache_bytes=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
    )
    requests = workload(args.requests, args.prompt_len, args.output_len, args.adapters, base_share=0.1)

    model = load(args)
    single = rounds(EngineCore(model, config, set()), requests, make_adapters(model, args.adapters), args.rounds)
    del model  # the group's rank 0 takes the same device
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    device = "cuda" if args.device.startswith("cuda") else "cpu"
    settings = Settings(tensor_parallel=args.tensor_parallel, device=device, threads=args.threads)
    group = spawn_group(settings)
    group.send_at_start(str(model_dir(args)))
    sharded, _ = load_model(str(model_dir(args)), torch.device(args.device), dtype_of(args), args.tensor_parallel)
    sender = AdapterSender(max_bytes=2**34, max_count=args.adapters)
    core = EngineCore(sharded, config, set(), partial(TensorParallelDriver, group=group, adapters=sender))
    grouped = rounds(core, requests, make_adapters(sharded, args.adapters), args.rounds)
    group.stop()

    result = {
        "date": stamp(),
        "machine": machine(),
        "preset": args.preset,
        "tensor_parallel": args.tensor_parallel,
        "one_device_tokens_per_s": statistics.median(single),
        "group_tokens_per_s": statistics.median(grouped),
        "rounds": {"one_device": single, "group": grouped},
    }
    result["speedup"] = result["group_tokens_per_s"] / result["one_device_tokens_per_s"]
    print(
        f"{args.preset}: 1 device {result['one_device_tokens_per_s']:.0f} tok/s, "
        f"{args.tensor_parallel} ranks {result['group_tokens_per_s']:.0f} tok/s, x{result['speedup']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
