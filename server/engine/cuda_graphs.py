"""Decode-only steps of the paged backend, replayed from CUDA graphs.

ReFT edits touch prompt positions only, so a step that only decodes runs the plain model, and with the
paged decode kernel its work depends on nothing but its number of rows. Such a step is captured once
per batch-size bucket (1, 2, 4, 8, then every multiple of 8 up to max_num_seqs) and replayed: one graph
launch instead of hundreds of kernel launches and the Python of every layer.

Inputs live in a persistent buffer with one column per sequence of the batch: its token id, position,
slot, context length and block table. The step writes its columns into the step's upload (the runner's
one host-to-device copy, transfers.py's StepUpload, which also carries the step's new blocks and, with
async scheduling, where its pending tokens go) and, once that was sent, copies them into the buffer the
graphs read, on the device. Padding sequences (the bucket rounds the batch up) decode token 0 at
position 0 into the first slot of the pool's pad block and read only that; the graph zeroes the block
again after the forward, so it stays all zeros for the sdpa path.
Every bucket's logits land in one shared buffer, valid until the next step.

With `compile_backend` (`--compile`), the forward is first compiled by torch.compile, dynamic in the
batch so that one compilation serves every bucket: Inductor fuses each layer's small kernels (norms,
rotary embeddings, activations, residual adds) and the graphs capture the fused ones. The attention
stays an opaque op (attention.py's `step_attention`).

Off CUDA nothing is captured: the same padded buffers run eagerly (compiled too with a backend), which
is what the tests check.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from server.engine.attention import STEP_KWARG, PagedDecodeRows, StepAttention, compiled_step
from server.engine.kv_cache import KVCache
from server.engine.paged_decode import decode_kernel
from server.engine.transfers import StepUpload, place_pending

log = logging.getLogger(__name__)

TOKEN, POSITION, SLOT, CONTEXT, TABLE = range(5)  # rows of the metadata buffers; the block table's start here


@dataclass(frozen=True)
class GraphInputs:
    """A decode step staged for the graphs: `rows` real sequences in a bucket of `meta`'s columns."""

    rows: int
    meta: Tensor  # [TABLE + width, bucket size] on the device once the upload was sent
    pairs: Tensor | None  # where the pending tokens go (async scheduling), as transfers.place_pending takes them


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [size for size in (1, 2, 4) if size < max_num_seqs]
    return sizes + list(range(8, max_num_seqs, 8)) + [max_num_seqs]


class DecodeGraphs:
    def __init__(
        self, model: nn.Module, kv: KVCache, max_num_seqs: int, max_model_len: int, compile_backend: str | None = None
    ):
        """`compile_backend`: torch.compile the forward with it (one graph, dynamic in the batch) first."""
        self.model = model
        self.kv = kv
        self.device = next(model.parameters()).device
        self.sizes = bucket_sizes(max_num_seqs)
        self.width = -(-max_model_len // kv.block_size)  # block table entries a sequence can have
        self.pad_slot = kv.pad_block * kv.block_size
        self.capture = self.device.type == "cuda"
        self.meta = torch.zeros((TABLE + self.width, max_num_seqs), dtype=torch.long, device=self.device)
        self.logits: Tensor | None = None  # [max_num_seqs, vocab] once the first step ran
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.steps_run = 0
        self._pool = None
        self._compiled = None
        if compile_backend is not None:
            # engines over one model share the compiled code (Dynamo guards on the model, not on this
            # object); past 8 models in one process, Dynamo would run the forward eagerly
            self._compiled = torch.compile(self._model_logits, backend=compile_backend, dynamic=True)

    def fits(self, batch) -> bool:
        """Whether a step (model_runner's StepBatch) decodes only, edits nothing, samples every row, scores
        no prompt token and is small enough to replay."""
        spans = batch.spans
        return (
            not batch.edits
            and not batch.scored
            and len(spans) <= self.sizes[-1]
            and len(batch.keep) == len(spans)
            and all(s.length == 1 and len(s.block_table) <= self.width for s in spans)
        )

    def stage(self, batch, upload: StepUpload) -> GraphInputs:
        """Stage a step that `fits` in `upload`, for `run` once that was sent."""
        rows = len(batch.spans)
        size = next(s for s in self.sizes if s >= rows)
        width = max(len(s.block_table) for s in batch.spans)
        meta = self._stage(upload, size, width, batch.token_ids, batch.positions, batch.slots, batch.spans)
        pairs = upload.stage(batch.from_pending) if batch.from_pending else None
        return GraphInputs(rows, meta, pairs)

    def run(self, inputs: GraphInputs, pending: Tensor | None = None) -> Tensor:
        """Logits [rows, vocab] of a staged step (a view: read it before the next step); `pending`: the
        previous step's sampled tokens, which the step's `from_pending` places (model_runner.py)."""
        size = self._load(inputs.meta)
        if inputs.pairs is not None:
            place_pending(self.meta[TOKEN], inputs.pairs, pending)
        self.steps_run += 1
        if not self.capture:
            self._forward(size)
        else:
            if size not in self.graphs:
                self.graphs[size] = self._capture(size)
            self.graphs[size].replay()
        return self.logits[: inputs.rows]

    @torch.inference_mode()
    def capture_all(self, largest_only: bool = False) -> None:
        """Capture every bucket now, largest first, so serving never pauses to capture; logs what it cost.
        `largest_only`: that bucket alone, whose memory the others reuse (they share one pool), for sizing
        the KV pool (memory.py)."""
        if not self.capture:
            return
        started, reserved = time.perf_counter(), torch.cuda.memory_reserved(self.device)
        upload = StepUpload(self.device)
        for size in reversed(self.sizes[-1:] if largest_only else self.sizes):
            padding = self._stage(upload, size, 1, [], [], [], [])
            upload.send()
            self._load(padding)
            self.graphs[size] = self._capture(size)
        if largest_only:
            return
        cost = {
            "buckets": len(self.graphs),
            "seconds": round(time.perf_counter() - started, 2),
            "memory_bytes": torch.cuda.memory_reserved(self.device) - reserved,  # outside the KV budget
        }
        log.info("decode steps captured as CUDA graphs", extra={"fields": cost})

    def _stage(self, upload: StepUpload, size: int, width: int, token_ids, positions, slots, spans) -> Tensor:
        """The bucket's columns of the metadata buffer, [TABLE + width, size], staged in `upload`."""
        rows = len(spans)
        host, staged = upload.reserve((TABLE + width, size))
        host[TOKEN, :rows], host[POSITION, :rows], host[SLOT, :rows] = token_ids, positions, slots
        host[CONTEXT, :rows] = [s.start + 1 for s in spans]
        # padding columns: token 0 at position 0 into the pad slot, reading only the pad block
        host[[TOKEN, POSITION, SLOT, CONTEXT], rows:size] = [[0], [0], [self.pad_slot], [1]]
        tables = host[TABLE:]
        tables.fill(self.kv.pad_block)
        for column, span in enumerate(spans):
            tables[: len(span.block_table), column] = span.block_table
        return staged

    def _load(self, staged: Tensor) -> int:
        """Copy staged columns (sent) into the buffer the graphs read, on the device; returns the bucket size.
        Table entries past the staged width keep older values, which no context length reaches."""
        rows, size = staged.shape
        self.meta[:rows, :size].copy_(staged)
        return size

    def _forward(self, size: int) -> None:
        meta = self.meta[:, :size]
        reader = PagedDecodeRows(self.kv, meta[TABLE:].T, meta[CONTEXT], decode_kernel(self.device.type))
        attention = StepAttention(self.kv, meta[SLOT], reader)
        if self._compiled is None:
            logits = self._model_logits(meta[TOKEN][None], meta[POSITION][None], **{STEP_KWARG: attention})
        else:
            with compiled_step(attention):
                logits = self._compiled(meta[TOKEN][None], meta[POSITION][None])
        if self.logits is None:
            self.logits = logits.new_empty((self.sizes[-1], logits.shape[-1]))
        self.logits[:size].copy_(logits)
        self.kv.zero_pad_block()  # the padding rows wrote there

    def _model_logits(self, input_ids: Tensor, position_ids: Tensor, **step) -> Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **step).logits[0]

    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        # warm up on a side stream first (Triton compiles, cuBLAS picks its kernels), as CUDA graphs require
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._forward(size)
        return graph
