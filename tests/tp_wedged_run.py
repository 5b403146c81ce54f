"""Rank 0 of a two-process tensor-parallel group on CPU whose follower wedges (SIGSTOP) once it serves,
for test_tensor_parallel_faults: with a short STEP_TIMEOUT, sends it a ping (`ping`) or not (`stop`),
then stops the group; prints what the ping raised, the group's problem after, the seconds from the
wedge to the end of the stop and the follower's exit code, as JSON.

    python -m tests.tp_wedged_run MODEL_DIR FIRST
"""

import json
import os
import signal
import sys
import time
from datetime import timedelta

import torch

from server.config import Settings
from server.distributed import group as tensor_parallel_group
from server.distributed.group import PING, GroupBroken
from server.distributed.launch import spawn_group
from server.distributed.runner import KVGeometry
from server.models.loader import load_model

STEP_TIMEOUT = timedelta(seconds=2)


def main(model_dir: str, first: str) -> None:
    tensor_parallel_group.STEP_TIMEOUT = STEP_TIMEOUT  # rank 0's step channel takes it when the group forms
    group = spawn_group(Settings(tensor_parallel=2, device="cpu", threads=1, log_level="warning"))
    group.send_at_start(model_dir)
    load_model(model_dir, torch.device("cpu"), torch.float32, tensor_parallel=2)  # the ranks load it together
    group.send_at_start(KVGeometry(num_blocks=4, block_size=16))
    group.send(PING)  # the follower serves
    (follower,) = group.followers
    os.kill(follower.pid, signal.SIGSTOP)
    wedged = time.monotonic()
    ping_error = None
    if first == "ping":
        try:
            group.send(PING)
        except GroupBroken as e:
            ping_error = str(e)
    group.stop()
    result = {"ping_error": ping_error, "problem": group.problem(), "seconds": time.monotonic() - wedged}
    follower.join(5)  # killed, if stop killed it
    print(json.dumps({**result, "exit_codes": [follower.exitcode]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
