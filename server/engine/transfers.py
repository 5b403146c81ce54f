"""Moves between host and device that never make the host wait for the device.

A plain copy from pageable host memory to a CUDA device synchronizes the stream first, so the host
would wait for every kernel queued before it: with async scheduling (core.py) that is the step still
running, whose overlap with the next step's host work is the point. Small inputs therefore go through
pinned memory without blocking, and sampled tokens come back the same way, with an event to wait on
only when they are read. On a CPU these are plain copies.

A step's integer inputs (token ids, positions, slots, block tables, tiles, edited rows) travel together:
`StepUpload` stages them in one pinned buffer and sends them with one copy.
"""

from __future__ import annotations

import math
import time
from functools import partial

import numpy as np
import torch
from torch import Tensor


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list or array as a tensor on `device`, queued behind the device's work instead of waiting for it."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    # the caching host allocator keeps the pinned block until the copy has run
    if isinstance(values, np.ndarray):  # torch.tensor(pin_memory=True) refuses numpy arrays
        host = torch.from_numpy(values).to(dtype).pin_memory()
    else:
        host = torch.tensor(values, dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)


# int64 elements: a staged tensor starts on a 16-byte boundary. Triton compiles a variant of a kernel per
# alignment of each pointer it takes (16 bytes or not), so staged tensors that started anywhere would compile
# variants while serving (a step's stall) and run ones that tests/test_triton_compile.py never compiled
ALIGNMENT = 2


class StepUpload:
    """One step's integer inputs, on their way to the device in one copy.

    `reserve` and `stage` hand out the device tensor that values will be in: a view of the step's device
    buffer, which `send` fills. Nothing may read it before `send`: build the step's inputs, send, then
    launch. Each step takes fresh buffers from torch's caching allocators, which hand a block out again
    only once the device is done with it, so the host can stage the next step while the device still
    reads this one's (async scheduling). A step that outgrows its buffers sends what it staged so far
    and goes on in buffers at least twice as large, which later steps keep. Off CUDA the device buffer
    starts as -1s, so that a read before `send` fails the tests instead of passing by chance.
    """

    def __init__(self, device: torch.device, capacity: int = 4096):
        self.device = device
        self.copies = 0  # host-to-device copies made: one per step once the buffers have grown
        self._capacity = capacity
        self._source = self._host = self._target = None
        self._used = 0

    def reserve(self, shape: tuple[int, ...]) -> tuple[np.ndarray, Tensor]:
        """Room for an int64 array of `shape`: the host array to write it into, and its tensor on the device,
        which starts on a 16-byte boundary (`ALIGNMENT`)."""
        size = math.prod(shape)
        if self._source is None:  # the first stage since `send`
            self._open(self._capacity)
        begin = -(-self._used // ALIGNMENT) * ALIGNMENT
        if begin + size > self._capacity:
            self._copy()
            self._open(2 * max(self._capacity, size))
            begin = 0
        self._used = begin + size
        return self._host[begin : self._used].reshape(shape), self._target[begin : self._used].view(shape)

    def stage(self, values: list | np.ndarray) -> Tensor:
        """`values` (a list, nested lists or an array of integers) as an int64 tensor on the device, after `send`."""
        array = np.asarray(values, dtype=np.int64)
        host, device = self.reserve(array.shape)
        host[...] = array
        return device

    def send(self) -> None:
        """Copy everything staged to the device; the next stage starts new buffers."""
        self._copy()
        self._source = self._host = self._target = None
        self._used = 0

    def _open(self, capacity: int) -> None:
        """Fresh buffers of `capacity`. If allocating them fails (out of memory), the buffers before stay,
        with what they staged: a `send` then copies that again, never an unwritten buffer."""
        cuda = self.device.type == "cuda"
        source = torch.empty(capacity, dtype=torch.long, pin_memory=cuda)
        make = torch.empty if cuda else partial(torch.full, fill_value=-1)
        target = make((capacity,), dtype=torch.long, device=self.device)
        # numpy writes into the same memory: faster than torch.tensor(lists)
        self._source, self._host, self._target = source, source.numpy(), target
        self._capacity, self._used = capacity, 0

    def _copy(self) -> None:
        if self._used:
            self._target[: self._used].copy_(self._source[: self._used], non_blocking=True)
            self.copies += 1


class HostCopy:
    """A device tensor on its way to the host: the copy is queued now, `wait` returns it once it landed."""

    def __init__(self, tensor: Tensor):
        self.waited = 0.0  # seconds `wait` blocked for the device (0 until then, and off CUDA)
        self._ready = None
        if tensor.device.type != "cuda":
            self._host = tensor
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record(torch.cuda.current_stream(tensor.device))

    def landed(self) -> bool:
        """Whether `wait` would return at once (asks the device, never waits)."""
        return self._ready is None or self._ready.query()

    def wait(self) -> Tensor:
        if self._ready is not None:
            started = time.perf_counter()
            self._ready.synchronize()
            self.waited += time.perf_counter() - started
        return self._host


def place_pending(tokens: Tensor, pairs: Tensor, pending: Tensor) -> None:
    """Write `pending[j]` into `tokens[i]` for every (i, j) of `pairs` [n, 2], on the device: the input tokens
    of a step that the step before it sampled and the host has not read yet."""
    tokens.index_copy_(0, pairs[:, 0], pending.index_select(0, pairs[:, 1]))
