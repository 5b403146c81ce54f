"""Sizing the KV pool from the device, as vLLM's `--gpu-memory-utilization` does.

On a GPU the pool takes what is left of `utilization` x the device's memory once the weights are in,
a warm-up step with the largest batch has shown the peak of activations (`max_batched_tokens` prompt
tokens, each scored as prompt logprobs may score it: a logits row per token; then a draw for
`max_num_seqs` rows through the sampler's costliest path), and room is kept for the decode steps' CUDA
graphs (their largest bucket, captured once over a pool of its own: the buckets share one memory pool,
which the largest fills); memory other processes hold counts as used.
On a CPU there is nothing to measure: the pool gets a fixed default and users size it with
`--kv-cache-memory`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch
from torch import nn

from server.engine.config import EngineConfigError

log = logging.getLogger(__name__)

CPU_DEFAULT_BYTES = 512 * 2**20


def budget_from_measurements(total: int, used: int, transient_peak: int, utilization: float) -> int:
    """Bytes left for the pool: the allowed share of the device, less what is held now (weights,
    other processes, the allocator's cache) and less the activations' peak above that."""
    return int(total * utilization) - used - transient_peak


@torch.inference_mode()
def auto_kv_budget(model: nn.Module, warm_up, utilization: float, graphs_bytes: Callable[[], int] | None = None) -> int:
    """The pool's budget on the model's device; `warm_up()` runs one step with the largest batch, and
    `graphs_bytes()`, if given, captures the decode graphs' largest bucket and returns what it keeps:
    the pool leaves room for both."""
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
    graphs = _graphs_bytes(graphs_bytes) if graphs_bytes is not None else 0
    budget = budget_from_measurements(total, total - free, transient_peak + graphs, utilization)
    fields = {"total": total, "used": total - free, "peak": transient_peak, "graphs": graphs, "kv_bytes": budget}
    log.info("KV cache sized from the device", extra={"fields": fields})
    if budget <= 0:
        raise EngineConfigError(
            ("gpu_memory_utilization", "max_batched_tokens"),
            f"no memory left for the KV cache at {utilization}: the weights, a warm-up step and the CUDA graphs use "
            f"{total - free + transient_peak + graphs} of {total} bytes; raise the utilization or lower "
            "max_batched_tokens",
        )
    return budget


def _graphs_bytes(measure: Callable[[], int]) -> int:
    """`measure()`, with the graphs it captured released again; 0 (and a warning) if capturing fails,
    which serving would then meet too and survive by decoding eagerly."""
    try:
        held = measure()
    except Exception:
        log.exception("capturing a decode graph to size the KV cache failed: no room is kept for graphs")
        held = 0
    gc.collect()  # the graphs may sit in a reference cycle (a compiled forward holds its owner)
    torch.cuda.empty_cache()
    return max(0, held)
