"""Runs one engine step: packs the scheduled chunks into one row, runs the frozen model once with
the step's attention metadata and intervention plan, and returns the logits of the rows that sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from server.engine.attention import STEP_KWARG, Span, StepAttention
from server.engine.kv_cache import KVCache
from server.engine.scheduler import ScheduledChunk
from server.engine.sequence import Sequence
from server.reft.hooks import PLAN_KWARG, install_plan_hooks
from server.reft.plan import Chunk, build_plan


@dataclass
class StepResult:
    sampling: list[ScheduledChunk]  # chunks whose last row sampled, in the order of `logits` rows
    logits: Tensor | None  # [len(sampling), vocab]
    failures: dict[Sequence, str] = field(default_factory=dict)  # sequences whose adapter failed or blew up


def slots_for(block_table: list[int], start: int, length: int, block_size: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, start + length)]


class ModelRunner:
    def __init__(self, model: nn.Module, kv: KVCache):
        self.model = model
        self.kv = kv
        self.device = next(model.parameters()).device
        self._hooks = install_plan_hooks(model)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> StepResult:
        chunks = sorted(chunks, key=lambda c: c.length > 1)  # decodes first; the sort is stable
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        spans: list[Span] = []
        plan_chunks: list[Chunk] = []
        sample_rows: list[int] = []
        sampling: list[ScheduledChunk] = []
        for chunk in chunks:
            seq, row = chunk.seq, len(token_ids)
            token_ids.extend(seq.token_ids[chunk.start : chunk.start + chunk.length])
            positions.extend(range(chunk.start, chunk.start + chunk.length))
            slots.extend(slots_for(seq.block_table, chunk.start, chunk.length, self.kv.block_size))
            spans.append(Span(row, chunk.length, chunk.start, seq.block_table))
            if seq.adapter is not None and chunk.start < seq.num_prompt:
                plan_chunks.append(Chunk(seq, seq.adapter, seq.positions, row, chunk.start, chunk.length))
            if chunk.completes:
                sample_rows.append(row + chunk.length - 1)
                sampling.append(chunk)

        slot_mapping = torch.tensor(slots, dtype=torch.long, device=self.device)
        kwargs = {STEP_KWARG: StepAttention.build(self.kv, spans, slot_mapping)}
        plan = build_plan(plan_chunks, self.device)
        if plan is not None:
            kwargs[PLAN_KWARG] = plan
        keep = sample_rows or [len(token_ids) - 1]  # a step of partial prefills still needs one row
        self.kv.zero_new_blocks()
        out = self.model(
            input_ids=torch.tensor([token_ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            logits_to_keep=torch.tensor(keep, device=self.device),
            use_cache=False,
            **kwargs,
        )
        logits = out.logits[0] if sample_rows else None
        failures = {**plan.non_finite_owners(), **plan.failures} if plan is not None else {}
        return StepResult(sampling, logits, failures)
