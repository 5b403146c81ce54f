"""Attention over the engine's paged KV cache, plugged into transformers' AttentionInterface.

The engine packs every scheduled sequence of a step into one row [1, T], decodes first. Models loaded
with `attn_implementation=ATTENTION_NAME` call `paged_attention` per layer with that step's queries,
keys and values; it writes the new keys/values into the pool and attends each sequence over its own
cached context, with one of three backends (the engine's `attention_backend`; "auto" is paged on CUDA,
sdpa elsewhere):

- "sdpa" (the CPU default, and the reference the others are tested against): sequences are batched in
  (at most) two padded groups, one-token queries (decode) and longer chunks (prefill), each one SDPA
  call over whole blocks gathered from the pool, with a boolean mask built once per step.
- "paged": decode rows and prefill chunks read the pool in place, each with a kernel of its own
  (paged_decode.py, paged_prefill.py: Triton kernels on CUDA, their torch twins elsewhere). Its
  decode-only steps can be replayed from CUDA graphs.
- "flex" (paged_flex.py): FlexAttention reads the pool in place through a block mask built once per
  step; compiled on CUDA, eager on CPU.

Each backend is a step reader with `attend(layer, queries, scaling, sliding_window)`; the pool write
stays here, the same for all.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface

from server.engine.config import ATTENTION_BACKENDS
from server.engine.kv_cache import KVCache, stage_block_tables
from server.engine.paged_decode import DecodeKernel, decode_kernel
from server.engine.paged_flex import FlexStep, flex_kernel
from server.engine.paged_prefill import QUERY_TILE, PrefillKernel, prefill_kernel, prefill_tiles
from server.engine.transfers import StepUpload

ATTENTION_NAME = "reft_paged"
STEP_KWARG = "reft_attention"
LAYER_KWARG = "reft_layer"


@dataclass(frozen=True)
class Span:
    """One sequence's rows in a packed step."""

    row: int  # first row of the sequence in the step
    length: int  # query tokens this step
    start: int  # absolute position of the first query token (tokens already cached)
    block_table: list[int]
    padding: bool = False  # rows that only pad the step (model_runner.py's `padded`), over the pad block


class AttentionGroup:
    """Sequences attended together: queries padded to the longest, contexts to the longest."""

    def __init__(self, spans: list[Span], block_size: int, pad_block: int, num_rows: int, upload: StepUpload):
        rows, lengths, starts = np.array([(s.row, s.length, s.start) for s in spans]).T[:, :, None]  # [n, 1] each
        query_len, context_len = int(lengths.max()), int((starts + lengths).max())
        offsets = np.arange(query_len)
        query_rows, padding = rows + offsets, offsets >= lengths  # [n, query_len] each
        self.gather_rows = upload.stage(np.where(padding, 0, query_rows)).flatten()
        # padded query rows are written to the spare row `num_rows` and dropped
        self.scatter_rows = upload.stage(np.where(padding, num_rows, query_rows)).flatten()
        self.query_pos = upload.stage(starts + offsets)
        max_blocks = -(-context_len // block_size)
        # whole blocks are gathered (contiguous copies); padding reads the always-zero pad block, masked out
        self.block_ids = stage_block_tables(upload, [s.block_table for s in spans], max_blocks, pad_block).flatten()
        self.shape = (len(spans), query_len, context_len)
        # one sequence from position 0 needs only SDPA's built-in causal mask
        self.plain_causal = len(spans) == 1 and spans[0].start == 0
        self._masks: dict[int | None, Tensor] = {}

    def mask(self, sliding_window: int | None) -> Tensor:
        if sliding_window not in self._masks:
            key_pos = torch.arange(self.shape[2], device=self.query_pos.device)
            query_pos = self.query_pos[:, :, None]
            allowed = key_pos <= query_pos
            if sliding_window is not None:
                allowed &= key_pos > query_pos - sliding_window
            self._masks[sliding_window] = allowed[:, None]  # [n, 1, q, k]
        return self._masks[sliding_window]

    def attend(
        self, queries: Tensor, keys: Tensor, values: Tensor, scaling: float | None, sliding_window: int | None
    ) -> Tensor:
        """queries [T, H, D] of the step, keys/values [blocks, block size, KV, D] of a layer -> [n * q, H, D]."""
        n, query_len, context_len = self.shape
        heads, kv_heads = queries.shape[1], keys.shape[2]
        q = queries.index_select(0, self.gather_rows).view(n, query_len, heads, -1).transpose(1, 2)
        k = keys.index_select(0, self.block_ids).flatten(0, 2)  # [n * blocks * block size, KV, D]
        v = values.index_select(0, self.block_ids).flatten(0, 2)
        k = k.view(n, -1, kv_heads, k.shape[-1])[:, :context_len].transpose(1, 2)
        v = v.view(n, -1, kv_heads, v.shape[-1])[:, :context_len].transpose(1, 2)
        window_bites = sliding_window is not None and context_len > sliding_window
        gqa = heads != kv_heads
        if self.plain_causal and not window_bites:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            mask = self.mask(sliding_window if window_bites else None)
            if gqa and q.is_cuda:  # CUDA's fused kernels take a mask or GQA, not both: math would materialise scores
                k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
                gqa = False
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(n * query_len, heads, -1)


class PagedDecodeRows:
    """Decode rows, the first `len(context)` rows of a step, attended in place by a paged decode kernel."""

    def __init__(self, kv: KVCache, tables: Tensor, context: Tensor, kernel: DecodeKernel):
        self.kv = kv
        self.tables = tables  # [rows, width] block ids
        self.context = context  # [rows] tokens each row attends over, its own included
        self.kernel = kernel

    @classmethod
    def from_spans(cls, kv: KVCache, spans: list[Span], upload: StepUpload) -> PagedDecodeRows:
        if [s.row for s in spans] != list(range(len(spans))) or any(s.length != 1 for s in spans):
            raise ValueError("paged decode rows must be one-token spans at the start of the step")
        context = upload.stage([s.start + 1 for s in spans])
        return cls(kv, _block_tables(kv, spans, upload), context, decode_kernel(upload.device.type))

    def attend(
        self, layer: int, queries: Tensor, scaling: float | None, sliding_window: int | None, out: Tensor | None = None
    ) -> Tensor:
        """queries [T, H, D] of the step -> attention of its first rows, written into `out` if given."""
        rows = queries[: self.context.shape[0]]
        out = torch.empty_like(rows) if out is None else out
        keys, values, block_size = self.kv.keys[layer], self.kv.values[layer], self.kv.block_size
        scale = _scale(scaling, rows)
        return self.kernel(out, rows, keys, values, self.tables, self.context, block_size, scale, sliding_window)


class PagedPrefillRows:
    """Prefill chunks, attended in place by a paged prefill kernel, tile by tile (paged_prefill.py)."""

    def __init__(self, kv: KVCache, spans: list[Span], upload: StepUpload):
        self.kv = kv
        self.tables = _block_tables(kv, spans, upload)  # [chunks, width]
        self.tiles = upload.stage(prefill_tiles([(s.row, s.length, s.start) for s in spans]))
        self.kernel: PrefillKernel = prefill_kernel(upload.device.type)

    def attend(self, layer: int, queries: Tensor, scaling: float | None, sliding_window: int | None, out: Tensor):
        """queries [T, H, D] of the step -> the chunks' rows of `out` written."""
        keys, values, block_size = self.kv.keys[layer], self.kv.values[layer], self.kv.block_size
        args = (self.tables, self.tiles, QUERY_TILE, block_size, _scale(scaling, queries), sliding_window)
        self.kernel(out, queries, keys, values, *args)


def _scale(scaling: float | None, queries: Tensor) -> float:
    return scaling if scaling is not None else queries.shape[-1] ** -0.5


def _block_tables(kv: KVCache, spans: list[Span], upload: StepUpload) -> Tensor:
    """The spans' block tables as one tensor on the device, padded to the longest with the pool's pad block."""
    tables = [s.block_table for s in spans]
    return stage_block_tables(upload, tables, max(len(table) for table in tables), kv.pad_block)


def _decode_and_prefill(spans: list[Span]) -> tuple[list[Span], list[Span]]:
    """One-token spans (decode rows, first in a step) and longer ones (prefill chunks)."""
    return [s for s in spans if s.length == 1], [s for s in spans if s.length > 1]


# A prompt's first chunk at least this long attends with SDPA's causal kernel (its own blocks gathered: no
# mask, no padding) rather than the paged prefill kernel, whose work grows with the square of the chunk. On
# an H100, one 4096-token chunk over 16 layers of the `1b` preset: 3.9 ms against 8.4 (bench/gpu.py's
# `kernel` part); the paged kernel wins on the short chunks of many prompts (1.4 against 5.3 ms for 13).
LONG_FIRST_CHUNK = 1024


def _causal_sdpa_is_fused(kv: KVCache) -> bool:
    """Whether SDPA takes a long first chunk in a fused kernel, KV head groups included. On CUDA only its
    flash kernel takes them, in 16 bits on sm80 and later; elsewhere it would fall back to its math kernel,
    which holds every score of the chunk (32 heads x 4096^2 in float32: 2 GiB a layer)."""
    if kv.keys.device.type != "cuda":
        return True
    sixteen_bits = kv.layout.dtype in (torch.float16, torch.bfloat16)
    return sixteen_bits and _capability(kv.keys.device.index) >= (8, 0)


@functools.cache
def _capability(device_index: int | None) -> tuple[int, int]:
    """The GPU's compute capability, asked once per device: every step that prefills wants it."""
    return torch.cuda.get_device_capability(device_index)


class PagedStep:
    """The paged backend's step: its decode rows and its prefill chunks each read the pool in place, but
    for long first chunks of prompts, each one causal SDPA call."""

    def __init__(self, kv: KVCache, spans: list[Span], num_rows: int, upload: StepUpload):
        decode, prefill = _decode_and_prefill(spans)
        fused = _causal_sdpa_is_fused(kv)
        long = [s for s in prefill if fused and s.start == 0 and s.length >= LONG_FIRST_CHUNK]
        prefill = [s for s in prefill if s not in long]
        self.kv = kv
        self.num_rows = num_rows
        self.decode = PagedDecodeRows.from_spans(kv, decode, upload) if decode else None
        self.prefill = PagedPrefillRows(kv, prefill, upload) if prefill else None
        # one span from position 0 each: SDPA's built-in causal mask, and no padded rows to drop
        self.long = [AttentionGroup([s], kv.block_size, kv.pad_block, num_rows, upload) for s in long]

    def attend(self, layer: int, queries: Tensor, scaling: float | None, sliding_window: int | None) -> Tensor:
        out = queries.new_empty((self.num_rows, *queries.shape[1:]))  # every row is a decode row or a chunk's
        if self.decode is not None:
            self.decode.attend(layer, queries, scaling, sliding_window, out[: self.decode.context.shape[0]])
        if self.prefill is not None:
            self.prefill.attend(layer, queries, scaling, sliding_window, out)
        if self.long:
            keys, values = self.kv.block_keys(layer), self.kv.block_values(layer)
            for group in self.long:
                out.index_copy_(0, group.scatter_rows, group.attend(queries, keys, values, scaling, sliding_window))
        return out


class SdpaStep:
    """One step's gathered SDPA groups over a KV pool (decode rows, prefill chunks); `attend` runs one layer."""

    def __init__(self, kv: KVCache, spans: list[Span], num_rows: int, upload: StepUpload):
        decode, prefill = _decode_and_prefill(spans)
        # padding rows in a group of their own: among the chunks they would pad every chunk's queries to their count
        chunks, padding = [s for s in prefill if not s.padding], [s for s in prefill if s.padding]
        self.kv = kv
        self.num_rows = num_rows
        groups = (decode, chunks, padding)
        self.groups = [AttentionGroup(g, kv.block_size, kv.pad_block, num_rows, upload) for g in groups if g]

    def attend(self, layer: int, queries: Tensor, scaling: float | None, sliding_window: int | None) -> Tensor:
        out = queries.new_empty((self.num_rows + 1, *queries.shape[1:]))  # + the spare row padded queries land in
        keys, values = self.kv.block_keys(layer), self.kv.block_values(layer)
        for group in self.groups:
            out.index_copy_(0, group.scatter_rows, group.attend(queries, keys, values, scaling, sliding_window))
        return out[:-1]


class FlexStepOverPool:
    """FlexStep reading one KV pool's layers."""

    def __init__(self, kv: KVCache, spans: list[Span], upload: StepUpload):
        self.kv = kv
        self.flex = FlexStep(spans, kv.block_size, kv.num_blocks + 1, upload, flex_kernel(upload.device.type))

    def attend(self, layer: int, queries: Tensor, scaling: float | None, sliding_window: int | None) -> Tensor:
        return self.flex.attend(queries, self.kv.keys[layer], self.kv.values[layer], scaling, sliding_window)


@dataclass
class StepAttention:
    """What every layer's attention needs for one step; built once per step by the model runner."""

    kv: KVCache
    slot_mapping: Tensor  # [T] slot of each new token
    reader: SdpaStep | PagedStep | FlexStepOverPool | PagedDecodeRows

    @classmethod
    def build(
        cls, kv: KVCache, spans: list[Span], slots: list[int], upload: StepUpload, backend: str = "sdpa"
    ) -> StepAttention:
        """The step's attention with its metadata staged in `upload`, to run once that was sent; `slots`: the
        new tokens' slots; `backend` as resolved for the device: sdpa, paged or flex."""
        slot_mapping = upload.stage(slots)
        if backend == "sdpa":
            return cls(kv, slot_mapping, SdpaStep(kv, spans, len(slots), upload))
        if backend == "paged":
            return cls(kv, slot_mapping, PagedStep(kv, spans, len(slots), upload))
        if backend == "flex":
            return cls(kv, slot_mapping, FlexStepOverPool(kv, spans, upload))
        raise ValueError(f"unknown attention backend {backend!r}; one of {', '.join(ATTENTION_BACKENDS)}")


def paged_attention(
    module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    if softcap is not None:
        raise NotImplementedError("attention logit softcapping is not supported")
    if torch.compiler.is_compiling():  # a compiled forward: the step is found when the op runs
        # a compiled layer is given its index (compiled_layers.py): reading the module's would make it a constant
        layer = kwargs[LAYER_KWARG] if LAYER_KWARG in kwargs else module.layer_idx
        return torch.ops.reft.step_attention(query, key, value, layer, scaling, sliding_window), None
    # a compiled layer that torch.compile runs eagerly after all (past its recompile limit) gets no step
    # kwarg: it finds the step where the compiled op would
    step: StepAttention | None = kwargs.get(STEP_KWARG) or _current_step()
    if step is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention runs only inside the engine (no {STEP_KWARG} given)")
    return _attend(step, query, key, value, module.layer_idx, scaling, sliding_window), None


def _attend(
    step: StepAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layer: int,
    scaling: float | None,
    sliding_window: int | None,
) -> Tensor:
    """query/key/value [1, heads, T, D] as transformers passes them -> [1, T, heads, D]."""
    queries, keys, values = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, D]
    if isinstance(step.reader, FlexStepOverPool):
        # flex reads other sequences' slots (eager: the whole pool; compiled: every block of a query tile)
        # and weighs them 0, but 0 * NaN is NaN: the values of a request whose edit blew up (which the edit
        # check fails) must not reach its neighbours. Keys need nothing: masked scores become -inf.
        values = values.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    step.kv.write(layer, step.slot_mapping, keys, values)
    return step.reader.attend(layer, queries, scaling, sliding_window).unsqueeze(0)


# -- compiled forwards ---------------------------------------------------------------------------------
# torch.compile must not trace the pool write or the paged kernel (the pool is not an input of the
# compiled graph, and the kernel is not traceable), so a compiled forward calls this opaque op, which
# reads the step from `compiled_step`, set around each call, as vLLM's forward context does. The steps
# are kept per thread: engines stepping in threads of one process must never see each other's.
_local = threading.local()


def _current_step() -> StepAttention | None:
    """The innermost `compiled_step` of this thread, if any."""
    steps = getattr(_local, "steps", None)
    return steps[-1] if steps else None


@contextmanager
def compiled_step(step: StepAttention) -> Iterator[None]:
    """The step that compiled forwards run inside this block, on this thread."""
    if not hasattr(_local, "steps"):
        _local.steps = []
    _local.steps.append(step)
    try:
        yield
    finally:
        _local.steps.pop()


# It writes the KV pool, yet declares no mutation: the pool is not among its arguments (so the compiler
# neither copies nor reorders around it), and nothing else in a compiled forward reads the pool.
@torch.library.custom_op("reft::step_attention", mutates_args=())
def step_attention(
    query: Tensor, key: Tensor, value: Tensor, layer: int, scaling: float | None, sliding_window: int | None
) -> Tensor:
    step = _current_step()
    if step is None:
        raise RuntimeError(f"a compiled {ATTENTION_NAME} forward runs only inside compiled_step()")
    return _attend(step, query, key, value, layer, scaling, sliding_window)


@step_attention.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, layer: int, scaling: float | None, sliding_window: int | None):
    return query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))


def register_paged_attention() -> None:
    """Make `ATTENTION_NAME` known to transformers, before a model is loaded with it; safe to call
    any number of times (it maps the name to the same function again)."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
