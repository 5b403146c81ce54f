"""Rank 0 of a two-process tensor-parallel group on CPU, for test_tensor_parallel: spawns rank 1 as
the server does, runs a mixed workload through the engine and prints each request's tokens (and prompt
logprobs, where it asks for them) as JSON.

    python -m tests.tp_engine_run MODEL_DIR WORKLOAD_JSON MAX_ADAPTERS_ON_FOLLOWERS
"""

import json
import sys
from functools import partial
from pathlib import Path

import torch

from server.adapters.format import AdapterFile
from server.adapters.materialize import materialize
from server.config import Settings
from server.distributed.adapter_mirror import AdapterSender
from server.distributed.launch import spawn_group
from server.distributed.runner import TensorParallelDriver
from server.models.loader import load_model
from tests.engine_utils import make_core, run_core, seq

# eager steps padded to a multiple of 8 tokens: every rank must pad alike, and the tokens stay the reference's
CORE_CONFIG = dict(max_batched_tokens=32, max_num_seqs=6, step_token_multiple=8)


def main(model_dir: str, workload_path: str, max_adapters: str) -> None:
    torch.set_num_threads(1)
    settings = Settings(tensor_parallel=2, device="cpu", threads=1, log_level="warning", step_token_multiple=8)
    group = spawn_group(settings)
    group.send_at_start(model_dir)
    model, _ = load_model(model_dir, torch.device("cpu"), torch.float32, tensor_parallel=2)
    sender = AdapterSender(max_bytes=2**30, max_count=int(max_adapters))
    core = make_core(model, make_runner=partial(TensorParallelDriver, group=group, adapters=sender), **CORE_CONFIG)
    adapters = {}
    requests = []
    for item in json.loads(Path(workload_path).read_text()):
        adapter = None
        if item["adapter"] is not None:
            path = item["adapter"]
            adapters.setdefault(path, materialize(AdapterFile.load(path), name=Path(path).stem, version=1))
            adapter = adapters[path]
        sequence = seq(item["id"], item["prompt"], adapter, max_new_tokens=8, prompt_logprobs=item["prompt_logprobs"])
        requests.append((sequence, item["arrival"]))
    scored = {}
    tokens = run_core(core, requests, scored=scored)
    group.stop()
    print(json.dumps({"tokens": tokens, "scored": scored, "kv_heads_per_rank": core.kv.layout.num_kv_heads}))


if __name__ == "__main__":
    main(*sys.argv[1:])
