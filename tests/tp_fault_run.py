"""Rank 0 of a two-process tensor-parallel group on CPU, for test_tensor_parallel_faults: one rank's forward raises once
(`rank0` or `follower`, at its third forward); prints each request's tokens and error, and the group's
problem, as JSON.

    python -m tests.tp_fault_run MODEL_DIR ADAPTER_PATH SIDE
"""

import json
import multiprocessing
import sys
from functools import partial

import torch

from server.adapters.format import AdapterFile
from server.adapters.materialize import materialize
from server.config import Settings
from server.distributed.adapter_mirror import AdapterSender
from server.distributed.launch import spawn_group
from server.distributed.runner import TensorParallelDriver
from server.engine.model_runner import ModelRunner
from server.models.loader import load_model
from tests.engine_utils import make_core, prompt, run_core, seq

FAULT_AT = 3
FAULT_SIDE = sys.argv[3] if len(sys.argv) > 3 else None  # the spawned follower sees its parent's argv


def inject_fault(side: str) -> None:
    calls = []
    forward = ModelRunner.forward

    def failing_forward(self, batch, pending=None):
        calls.append(1)
        if len(calls) == FAULT_AT:
            raise RuntimeError(f"injected fault on {side}")
        return forward(self, batch, pending)

    ModelRunner.forward = failing_forward


is_follower = multiprocessing.current_process().name.startswith("reft-tp-rank")
if FAULT_SIDE == ("follower" if is_follower else "rank0"):
    inject_fault(FAULT_SIDE)


def main(model_dir: str, adapter_path: str, side: str) -> None:
    torch.set_num_threads(1)
    group = spawn_group(Settings(tensor_parallel=2, device="cpu", threads=1, log_level="warning"))
    group.send_at_start(model_dir)
    model, _ = load_model(model_dir, torch.device("cpu"), torch.float32, tensor_parallel=2)
    sender = AdapterSender(max_bytes=2**30, max_count=4)
    make_runner = partial(TensorParallelDriver, group=group, adapters=sender)
    core = make_core(model, make_runner=make_runner, max_batched_tokens=32, max_num_seqs=4)
    adapter = materialize(AdapterFile.load(adapter_path), name="a", version=1)
    requests = [
        (seq(f"r{i}", prompt(20 + 3 * i, seed=i), adapter if i % 2 else None, max_new_tokens=6), 6 * (i // 2))
        for i in range(4)
    ]
    finished = {}
    tokens = run_core(core, requests, finished=finished)
    problem = core.problem()
    group.stop()
    errors = {rid: error for rid, (_, error) in finished.items()}
    print(json.dumps({"tokens": tokens, "errors": errors, "problem": problem}))


if __name__ == "__main__":
    main(*sys.argv[1:])
