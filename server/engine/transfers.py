"""Moves between host and device that never make the host wait for the device.

A plain copy from pageable host memory to a CUDA device synchronizes the stream first, so the host
would wait for every kernel queued before it: with async scheduling (core.py) that is the step still
running, whose overlap with the next step's host work is the point. Small inputs therefore go through
pinned memory without blocking, and sampled tokens come back the same way, with an event to wait on
only when they are read. On a CPU these are plain copies.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list or array as a tensor on `device`, queued behind the device's work instead of waiting for it."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    # the caching host allocator keeps the pinned block until the copy has run
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class HostCopy:
    """A device tensor on its way to the host: the copy is queued now, `wait` returns it once it landed."""

    def __init__(self, tensor: Tensor):
        self._ready = None
        if tensor.device.type != "cuda":
            self._host = tensor
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record(torch.cuda.current_stream(tensor.device))

    def wait(self) -> Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host


def place_pending(tokens: Tensor, pairs: list[tuple[int, int]], pending: Tensor) -> None:
    """Write `pending[j]` into `tokens[i]` for every (i, j) of `pairs`, on the device: the input tokens of a
    step that the step before it sampled and the host has not read yet."""
    index = to_device(pairs, torch.long, tokens.device)
    tokens.index_copy_(0, index[:, 0], pending.index_select(0, index[:, 1]))
