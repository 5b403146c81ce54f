"""Rank 0 of a two-process tensor-parallel group on CPU whose start fails after its follower got the
model (the store is under a file), for test_tensor_parallel_faults: prints the error the start raised
and the follower's exit code right after it, as JSON.

    python -m tests.tp_start_run MODEL_DIR STORE
"""

import json
import sys

from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.distributed.launch import spawn_group


def main(model_dir: str, store: str) -> None:
    settings = Settings(
        model=model_dir,
        store=store,
        tensor_parallel=2,
        device="cpu",
        threads=1,
        kv_cache_memory="8MiB",
        max_model_len=256,
        log_level="warning",
    )
    group = spawn_group(settings)
    error = None
    try:
        with TestClient(create_app(settings, group=group)):
            pass
    except Exception as e:
        error = str(e)
    print(json.dumps({"error": error, "exit_codes": [process.exitcode for process in group.followers]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
