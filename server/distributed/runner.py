"""The model runner on each rank of a tensor-parallel group.

Rank 0's `TensorParallelDriver` is the engine's model runner: it packs a step as usual, sends the
packed batch to the followers, and runs the same forward pass they run. The all-reduces inside the
sharded model (transformers' tensor-parallel plan) line the ranks up. ReFT edits act on the decoder
layers' outputs, the full hidden state after the all-reduce, so every rank applies them all, the
same way. A follower (`follow`) has no scheduler: a KV cache of rank 0's geometry over its own KV
heads, whose blocks rank 0's block tables address, and a loop over rank 0's messages.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from server.config import Settings
from server.distributed.adapter_mirror import AdapterReceiver, AdapterSender
from server.distributed.group import PING, STOP, GroupBroken, TensorParallelGroup
from server.engine.kv_cache import KVCache, KVLayout
from server.engine.model_runner import ModelRunner, StepBatch
from server.models.loader import load_model, resolve_dtype
from server.plugins import load_plugins
from server.reft.plan import InterventionPlan

log = logging.getLogger(__name__)
PING_SECONDS = 1.0


@dataclass(frozen=True)
class KVGeometry:
    """What a follower's KV cache must share with rank 0's so that rank 0's slots address it."""

    num_blocks: int
    block_size: int


class TensorParallelDriver(ModelRunner):
    def __init__(
        self,
        model: nn.Module,
        kv: KVCache,
        attention_backend: str,
        group: TensorParallelGroup,
        adapters: AdapterSender,
        **graphs,
    ):
        super().__init__(model, kv, attention_backend, **graphs)
        self.group = group
        self.adapters = adapters
        group.send_at_start(KVGeometry(kv.num_blocks, kv.block_size))

    def forward(self, batch: StepBatch, pending: Tensor | None = None) -> tuple[Tensor, InterventionPlan | None]:
        """`pending` stays None: the core reads every step at once with tensor parallelism."""
        assert pending is None, "async scheduling is off with tensor parallelism"
        with self.adapters.sending():
            self.group.send(self.adapters.message(batch))
        try:
            return super().forward(batch)
        except Exception as e:  # the followers may wait in a collective this rank never reaches: no more steps
            self.group.break_off(f"rank 0 failed a step its followers ran: {type(e).__name__}: {e}")
            raise

    def idle(self) -> None:
        if time.monotonic() - self.group.last_sent >= PING_SECONDS:
            try:
                self.group.send(PING)
            except GroupBroken:
                pass  # recorded in the group: readiness reports it

    def problem(self) -> str | None:
        return self.group.problem()


def follow(group: TensorParallelGroup, settings: Settings, device: torch.device) -> None:
    """A follower's whole life: load its shard of the model, then run rank 0's steps until STOP."""
    load_plugins(settings.plugins)  # the intervention types rank 0 serves, before any adapter arrives
    model_path = group.receive_at_start()
    model, _ = load_model(model_path, device, resolve_dtype(settings.dtype, device), tensor_parallel=group.size)
    settings.apply_torch_threads(device.type)
    geometry: KVGeometry = group.receive_at_start()
    parameter = next(model.parameters())
    layout = KVLayout.from_config(model.config, parameter.dtype).sharded(group.size)
    kv = KVCache(layout, geometry.num_blocks, geometry.block_size, parameter.device, prefix_caching=False)
    runner = ModelRunner(
        model,
        kv,
        settings.attention_backend,
        fused_kernels=settings.fused_kernels,
        step_token_multiple=settings.step_token_multiple,
    )
    adapters = AdapterReceiver(parameter.dtype, parameter.device)
    while (message := group.receive()) != STOP:
        if message == PING:
            continue
        try:
            runner.forward(adapters.batch(message))
        except Exception:  # rank 0 may wait in a collective this rank never reaches: leaving breaks the group
            log.exception("tensor-parallel rank %d: step failed", group.rank)
            raise
