"""Sizing the KV pool from the device, as vLLM's `--gpu-memory-utilization` does.

On a GPU the pool takes what is left of `utilization` x the device's memory once the weights are in
and a warm-up step with the largest batch (`max_batched_tokens` prompt tokens) has shown the peak of
activations; memory other processes hold counts as used. On a CPU there is nothing to measure: the
pool gets a fixed default and users size it with `--kv-cache-memory`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

CPU_DEFAULT_BYTES = 512 * 2**20


def budget_from_measurements(total: int, used: int, transient_peak: int, utilization: float) -> int:
    """Bytes left for the pool: the allowed share of the device, less what is held now (weights,
    other processes, the allocator's cache) and less the activations' peak above that."""
    return int(total * utilization) - used - transient_peak


@torch.inference_mode()
def auto_kv_budget(model: nn.Module, warm_up, utilization: float) -> int:
    """The pool's budget on the model's device; `warm_up()` runs one step with the largest batch."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return CPU_DEFAULT_BYTES
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    warm_up()
    torch.cuda.synchronize(device)
    transient_peak = torch.cuda.max_memory_allocated(device) - resident
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = budget_from_measurements(total, total - free, transient_peak, utilization)
    log.info(
        "KV cache sized from the device",
        extra={"fields": {"total": total, "used": total - free, "peak": transient_peak, "kv_bytes": budget}},
    )
    if budget <= 0:
        raise ValueError(
            f"no memory left for the KV cache at gpu_memory_utilization {utilization}: the weights and a warm-up "
            f"step use {total - free + transient_peak} of {total} bytes; raise the utilization or lower "
            "max_batched_tokens"
        )
    return budget
