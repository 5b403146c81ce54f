"""Rank 0 of a two-process tensor-parallel group on CPU, for test_tensor_parallel: spawns rank 1 as
the server does, runs a mixed workload through the engine and prints each request's tokens (and prompt
logprobs, where it asks for them) as JSON.

    python -m tests.tp_engine_run MODEL_DIR WORKLOAD_JSON MAX_ADAPTERS_ON_FOLLOWERS STEP_TOKEN_MULTIPLE
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

CORE_CONFIG = dict(max_batched_tokens=32, max_num_seqs=6)


def main(model_dir: str, workload_path: str, max_adapters: str, multiple: str) -> None:
    """`multiple`: the steps' step_token_multiple, which every rank must pad to alike."""
    torch.set_num_threads(1)
    options = {"device": "cpu", "threads": 1, "log_level": "warning", "step_token_multiple": int(multiple)}
    group = spawn_group(Settings(tensor_parallel=2, **options))
    group.send_at_start(model_dir)
    model, _ = load_model(model_dir, torch.device("cpu"), torch.float32, tensor_parallel=2)
    sender = AdapterSender(max_bytes=2**30, max_count=int(max_adapters))
    driver = partial(TensorParallelDriver, group=group, adapters=sender)
    core = make_core(model, make_runner=driver, step_token_multiple=int(multiple), **CORE_CONFIG)
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
