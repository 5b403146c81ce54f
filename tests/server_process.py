"""Run `reft-server serve` as a real process on loopback (end-to-end tests and bench/compare.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

BANNER = re.compile(r"on http://127\.0\.0\.1:(\d+)")


class ServerProcess:
    def __init__(self, log_path: Path, *args: str, env: dict | None = None, startup_timeout: float = 120.0):
        self.log_path = log_path
        command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        environment = {**os.environ, "REFT_THREADS": "1", "REFT_LOG_JSON": "false", **(env or {})}
        self._log = open(log_path, "w")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=environment)
        try:
            self.url = self._wait_until_ready(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            match = BANNER.search(self.log())
            if match:
                url = f"http://127.0.0.1:{match.group(1)}"
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    return url
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
