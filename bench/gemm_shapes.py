"""What a matrix product costs the host when its row count is new, against one it has seen.

An eager engine step multiplies every projection of the model by a [tokens, hidden] activation whose
token count changes from step to step under a serving load (run F: the server's products took 36-45 us
of host time per call against 17-20 us in an engine whose steps all had the same 4,096 tokens). cuBLAS
picks a kernel on the host for each new shape and keeps what it picked; a step whose tokens were rounded
up to a few sizes would only ever ask for known shapes. This times, for each distinct weight shape of
the model's linear layers, the host's time per `F.linear` launch: over row counts it has already seen,
and over row counts it has not (each new once), neither waiting for the device inside the timed span.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.device_timing import synchronize
from server.reft.layers import decoder_layers

LAUNCHES = 32  # per timed span: few enough that the device's launch queue never fills and blocks the host


def linear_host_costs(model: nn.Module, rows: int, launches: int = LAUNCHES) -> list[dict]:
    """Per distinct weight shape of the linear layers of `model`'s first decoder layer (the projections an
    eager step runs on every token): the host's microseconds per launch of `F.linear` on just under `rows`
    rows, over row counts asked for before ("seen_us") and over ones never asked for ("new_us")."""
    launches = min(launches, (rows - 1) // 2)  # no count of 0 rows
    layer = decoder_layers(model)[0]
    weights = {tuple(m.weight.shape): m.weight for m in layer.modules() if isinstance(m, nn.Linear)}
    results = []
    for shape, weight in sorted(weights.items()):
        source = torch.randn(rows, shape[1], dtype=weight.dtype, device=weight.device)
        # interleaved, so that both sets do the same work: the even counts below `rows` and the odd ones
        seen, new = ([rows - 2 * launches + 2 * i + odd for i in range(launches)] for odd in (0, 1))
        for count in seen:  # each asked for once, outside the timed span
            F.linear(source[:count], weight)
        seen_us, new_us = _host_us(source, weight, seen), _host_us(source, weight, new)
        results.append({"shape": list(shape), "seen_us": seen_us, "new_us": new_us})
    return results


def _host_us(source, weight, counts: list[int]) -> float:
    """Microseconds of host time per launch, the device idle at the start and not waited for until the end."""
    synchronize(source.device)
    started = time.perf_counter()
    for count in counts:
        F.linear(source[:count], weight)
    elapsed = time.perf_counter() - started
    synchronize(source.device)
    return 1e6 * elapsed / len(counts)
