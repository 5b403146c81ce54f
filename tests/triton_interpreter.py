"""Run code in a child process under Triton's CPU interpreter (it reads TRITON_INTERPRET when a kernel is
defined, so the parent, which imported the kernels already, cannot): returns the child's last line."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def interpreted(code: str, *argv: str, timeout: float = 300) -> str:
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], env=environment, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def interpreted_cases(code: str, cases: list) -> list:
    """`code` run under the interpreter with `cases` as JSON in its argv[1]; its last line, read as JSON."""
    return json.loads(interpreted(code, json.dumps(cases)))
