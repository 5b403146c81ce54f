"""Timing on an accelerator: CUDA runs kernels asynchronously, so a clock read means nothing until the
device has caught up. Every timed section here synchronizes before it starts and before it stops, and
the same code times CPU runs (where synchronizing is a no-op), so the CPU smoke run exercises it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

GIB = 2**30


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Elapsed:
    seconds: float = 0.0


@contextmanager
def timed(device: torch.device | str) -> Iterator[Elapsed]:
    """Wall time of the block, with the device idle at both ends."""
    elapsed = Elapsed()
    synchronize(device)
    start = time.perf_counter()
    yield elapsed
    synchronize(device)
    elapsed.seconds = time.perf_counter() - start


def release_memory(device: torch.device | str) -> None:
    """Return freed blocks to the device and restart the peak counter: each part starts clean."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device | str) -> float | None:
    """Peak memory torch allocated on the device since the last release_memory (None on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def copy_bandwidth(device: torch.device | str, nbytes: int, repeats: int = 10) -> dict:
    """Memory bandwidth from a large device-to-device copy, counting the bytes read and the bytes written:
    `repeats` back-to-back copies in one timed span (so the synchronizations cost nothing next to them),
    after one warm-up copy. A decode step's memory floor is measured against this figure."""
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    with timed(device) as elapsed:
        for _ in range(repeats):
            target.copy_(source)
    del source, target
    seconds = elapsed.seconds / repeats
    return {"copy_bytes": nbytes, "copy_ms": 1000 * seconds, "gb_per_s": 2 * nbytes / seconds / 1e9}
