"""Runs one engine step: packs the scheduled chunks into one row, runs the frozen model once with
the step's attention metadata and ReFT's plan for the step, and returns the logits of the rows that
sample. Which rows a request's chunk edits is its ReFT edit's business (`seq.edit.rows`); the runner
only collects them and hands them to ReFT's planner.

Packing (`pack`, the scheduler's view) and the forward pass (`forward`, plain data in) are apart so
that every rank of a tensor-parallel group runs the same `forward` on what rank 0 packed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from server.engine.attention import STEP_KWARG, Span, StepAttention
from server.engine.compiled_layers import COMPILED_KWARG, compile_layers
from server.engine.config import decode_graphs_apply, resolve_attention_backend
from server.engine.cuda_graphs import DecodeGraphs, GraphInputs
from server.engine.fused_norms import fuse_rms_norms
from server.engine.fused_rotary import fuse_rotary
from server.engine.kv_cache import KVCache
from server.engine.prompt_logprobs import ScoredRows, rows_to_score
from server.engine.sampler import PendingTokens
from server.engine.scheduler import ScheduledChunk
from server.engine.sequence import Sequence
from server.engine.transfers import HostCopy, StepUpload, place_pending
from server.reft.hooks import install_plan_hooks, plan_kwargs
from server.reft.plan import EditedRows, InterventionPlan, build_plan

log = logging.getLogger(__name__)


class EditCheck:
    """Whether a step's ReFT edits left every edited row finite: the flags travel to the host with the step,
    and are read only when the core reads the step, so checking never makes the host wait early."""

    def __init__(self, plan: InterventionPlan):
        self.owners: list[Sequence] = plan.owners
        self._plan = plan
        self._finite = HostCopy(plan.finite_rows)

    def failures(self) -> dict[Sequence, str]:
        """The sequences whose edit blew up, with why; waits for the flags."""
        return self._plan.non_finite_owners(self._finite.wait().tolist())

    @property
    def waited(self) -> float:
        """Seconds `failures` blocked for the device."""
        return self._finite.waited

    def landed(self) -> bool:
        """Whether `failures` would return without waiting for the device."""
        return self._finite.landed()


@dataclass
class StepResult:
    sampling: list[ScheduledChunk]  # chunks whose last row sampled, in the order of `logits` rows
    logits: Tensor | None  # [len(sampling), vocab]
    failures: dict[Sequence, str] = field(default_factory=dict)  # sequences whose adapter raised
    check: EditCheck | None = None  # the finite check of the step's edits, to read with its tokens
    scored: list[ScoredRows] = field(default_factory=list)  # prompt tokens scored, in `prompt_logits` rows
    prompt_logits: Tensor | None = None  # [sum of their counts, vocab]


def slots_for(block_table: list[int], start: int, length: int, block_size: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, start + length)]


@dataclass
class StepBatch:
    """One forward pass's inputs as plain data, so rank 0 of a tensor-parallel group can send them."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    spans: list[Span]
    edits: list[EditedRows]  # the rows each request's edit touches in this step
    keep: list[int]  # rows that sample, whose logits are computed
    new_blocks: list[int]  # KV blocks handed out since the last step: cleared before the forward
    from_pending: list[tuple[int, int]] = field(default_factory=list)  # (row, PendingTokens row): token set on device
    scored: list[int] = field(default_factory=list)  # prompt rows whose logits are computed too, after `keep`'s


def padded(batch: StepBatch, multiple: int, kv: KVCache) -> StepBatch:
    """`batch` with padding rows after its own, up to a multiple of `multiple` tokens (itself if it is one).
    They are one chunk (two tokens or more: one would be a decode row, and those come first) of token 0, all at
    position 0 (within any model's positions), over the pool's pad block alone: they write their keys and
    values into its slots, the same values each, read nothing else, and are neither sampled nor edited. The
    caller clears the pad block after the forward."""
    count = -len(batch.token_ids) % multiple
    if count == 0:
        return batch
    if count == 1:
        count += multiple
    row, block_size = len(batch.token_ids), kv.block_size
    table = [kv.pad_block] * -(-count // block_size)
    return replace(
        batch,
        token_ids=batch.token_ids + [0] * count,
        positions=batch.positions + [0] * count,
        slots=batch.slots + [kv.pad_block * block_size + p % block_size for p in range(count)],
        spans=[*batch.spans, Span(row, count, 0, table, padding=True)],
    )


@dataclass
class EagerInputs:
    """A step that runs the model eagerly, its tensors staged in the step's upload."""

    attention: StepAttention
    plan: InterventionPlan | None
    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    keep: Tensor  # rows whose logits are computed: StepBatch's `keep`, then its `scored`
    pairs: Tensor | None  # where the pending tokens go (async scheduling), as transfers.place_pending takes them
    padding: bool = False  # padding rows wrote into the pad block (`padded`)


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv: KVCache,
        attention_backend: str = "sdpa",
        cuda_graphs: bool = False,
        max_num_seqs: int = 1,
        max_model_len: int = 1,
        compile_backend: str | None = None,
        fused_kernels: bool = True,
        step_token_multiple: int = 1,
    ):
        """`cuda_graphs` (paged backend only): replay decode-only steps of up to `max_num_seqs` sequences of
        up to `max_model_len` tokens from graphs captured now (cuda_graphs.py), of the forward compiled
        with `compile_backend` if given. With `compile_backend`, the other steps run each decoder layer
        compiled with it (compiled_layers.py). `fused_kernels`: fuse the model's norms and rotary embeddings
        first (fused_norms.py, fused_rotary.py), unless an engine in this process did already, and edit
        through the intervention types' fused kernels (plan.py). The steps
        run eagerly are padded to a multiple of `step_token_multiple` tokens (`padded`)."""
        self.model = model
        self.kv = kv
        self.step_token_multiple = step_token_multiple
        self.fused_kernels = fused_kernels
        self.device = next(model.parameters()).device
        self.attention_backend = resolve_attention_backend(attention_backend, self.device.type)
        self.upload = StepUpload(self.device)  # every step's integer inputs, in one host-to-device copy
        if fused_kernels:  # fewer, larger kernels with the model's own values
            fuse_rms_norms(model)
            fuse_rotary(model)
        self._hooks = install_plan_hooks(model)
        self._compiled_layer_kwargs = {}
        if compile_backend is not None:
            compile_layers(model, compile_backend)
            self._compiled_layer_kwargs = {COMPILED_KWARG: True}
        self.graphs = None
        if decode_graphs_apply(cuda_graphs, self.attention_backend):
            self.graphs = self._capture(model, kv, max_num_seqs, max_model_len, compile_backend)

    @staticmethod
    def _capture(model, kv, max_num_seqs, max_model_len, compile_backend) -> DecodeGraphs | None:
        """The decode graphs, of the compiled forward if asked; if compiling or capturing it fails, of the
        forward as it is; if that fails too, none (a model whose forward cannot be captured still serves,
        eagerly)."""
        for backend in dict.fromkeys([compile_backend, None]):
            graphs = DecodeGraphs(model, kv, max_num_seqs, max_model_len, backend)
            try:
                graphs.capture_all()
                return graphs
            except Exception:
                fallback = "uncompiled" if backend is not None else "eagerly, without graphs"
                log.exception("capturing the decode steps failed (compile backend %s): they run %s", backend, fallback)
        return None

    def idle(self) -> None:
        """Called by the engine loop when it has nothing to run (a tensor-parallel driver pings its group)."""

    def problem(self) -> str | None:
        """Why this runner cannot serve, for the readiness probe; a single process has no peers to lose."""
        return None

    def run(self, chunks: list[ScheduledChunk], pending: PendingTokens | None = None) -> StepResult:
        """`pending`: the tokens the previous step sampled, for chunks that end with one (async scheduling)."""
        batch, sampling, scored = self.pack(chunks, pending)
        logits, plan = self.forward(batch, pending.tokens if pending is not None else None)
        result = StepResult(sampling, logits[: len(sampling)] if sampling else None, scored=scored)
        if scored:
            result.prompt_logits = logits[len(batch.keep) :]
        if plan is not None:
            result.failures = dict(plan.failures)
            result.check = EditCheck(plan) if plan.finite_rows is not None else None
        return result

    def pack(
        self, chunks: list[ScheduledChunk], pending: PendingTokens | None = None
    ) -> tuple[StepBatch, list[ScheduledChunk], list[ScoredRows]]:
        """Lay the chunks out as one row; also returns the chunks that sample, in logits order, and the prompt
        tokens scored (prompt_logprobs.py), in the order of their rows after those. A chunk's last token may
        still be pending: its row gets a placeholder that the forward fills on the device."""
        chunks = sorted(chunks, key=lambda c: c.length > 1)  # decodes first; the sort is stable
        batch = StepBatch([], [], [], [], [], [], self.kv.take_new_blocks())
        sampling: list[ScheduledChunk] = []
        scored: list[ScoredRows] = []
        for chunk in chunks:
            seq, row = chunk.seq, len(batch.token_ids)
            known = seq.token_ids[chunk.start : chunk.start + chunk.length]
            batch.token_ids.extend(known)
            if len(known) < chunk.length:  # only the last one can be pending
                batch.token_ids.append(0)
                batch.from_pending.append((row + chunk.length - 1, pending.row_of[seq]))
            batch.positions.extend(range(chunk.start, chunk.start + chunk.length))
            batch.slots.extend(slots_for(seq.block_table, chunk.start, chunk.length, self.kv.block_size))
            batch.spans.append(Span(row, chunk.length, chunk.start, seq.block_table))
            if seq.edit is not None and (edited := seq.edit.rows(seq, row, chunk.start, chunk.length)):
                batch.edits.append(edited)
            if chunk.completes:
                batch.keep.append(row + chunk.length - 1)
                sampling.append(chunk)
            if (rows := rows_to_score(seq, chunk.start, chunk.length)) is not None:
                first_row = row + rows.first - 1 - chunk.start  # position p's row scores prompt token p + 1
                batch.scored.extend(range(first_row, first_row + rows.count))
                scored.append(rows)
        if not batch.keep and not batch.scored:
            batch.keep.append(len(batch.token_ids) - 1)  # a step of partial prefills still needs one row
        return batch, sampling, scored

    @torch.inference_mode()
    def forward(self, batch: StepBatch, pending: Tensor | None = None) -> tuple[Tensor, InterventionPlan | None]:
        """Run the model once: logits [len(batch.keep) + len(batch.scored), vocab] and the step's intervention
        plan. `pending`: the previous step's sampled tokens, which `batch.from_pending` places."""
        inputs = self._stage(batch)
        if isinstance(inputs, GraphInputs):
            return self.graphs.run(inputs, pending), None
        if inputs.pairs is not None:
            place_pending(inputs.input_ids, inputs.pairs, pending)
        try:
            out = self.model(
                input_ids=inputs.input_ids[None],
                position_ids=inputs.positions[None],
                logits_to_keep=inputs.keep,
                use_cache=False,
                **{STEP_KWARG: inputs.attention},
                **plan_kwargs(inputs.plan),
                **self._compiled_layer_kwargs,
            )
        finally:  # also after a forward that raised: the pad block must be all zeros for the next step
            if inputs.padding:
                self.kv.zero_pad_block()
        return out.logits[0], inputs.plan

    def _stage(self, batch: StepBatch) -> GraphInputs | EagerInputs:
        """Every integer input of the step, sent to the device in one copy; clears the step's new blocks."""
        upload = self.upload
        new_blocks = upload.stage(batch.new_blocks)
        try:
            if self.graphs is not None and self.graphs.fits(batch):
                return self.graphs.stage(batch, upload)
            rows = padded(batch, self.step_token_multiple, self.kv)
            return EagerInputs(
                StepAttention.build(self.kv, rows.spans, rows.slots, upload, self.attention_backend),
                build_plan(batch.edits, self.device, upload.stage, self.fused_kernels),
                upload.stage(rows.token_ids),
                upload.stage(rows.positions),
                upload.stage(batch.keep + batch.scored),
                upload.stage(batch.from_pending) if batch.from_pending else None,
                padding=rows is not batch,
            )
        finally:  # pack took the new blocks off the allocator: even a step that failed here must clear them
            upload.send()
            self.kv.zero_blocks(new_blocks)
