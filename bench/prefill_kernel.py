"""The paged backend's prefill against the gathered sdpa groups it replaced, timed on the device at hand.

bench/gpu.py's `kernel` part, second half. One step's prefill chunks, as the engine packs prompts of the
workload's lengths into its token budget, are attended over every layer of a pool of the model's layout
(random keys and values), twice: with the paged backend's step as the engine runs it (attention.py's
PagedStep: the in-place prefill kernel of paged_prefill.py, and SDPA's causal kernel for a prompt's first
chunk of LONG_FIRST_CHUNK tokens or more) and with the sdpa backend's gathered, padded groups
(AttentionGroup, KV heads repeated on CUDA).
Three cases: chunks from position 0 (new prompts); the same chunks after `cached` tokens each (later
chunks of long prompts, prefix-cache hits), where the gathered path copies the whole context; and one
prompt as long as the budget, where the gathered path is at its best (SDPA's causal flash kernel, no
mask) and the in-place kernel's work grows with the square of the chunk (the paged step sends such a
chunk to SDPA too). On CUDA each case also runs
the Triton kernel under a grid of other launches (query tokens per tile, key positions per iteration,
warps per program), each with its time and its largest difference from the default launch's output:
a launch clearly faster on the GPUs that serve becomes the default (paged_prefill.QUERY_TILE,
paged_prefill_triton.PrefillLaunch).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import torch
from torch import Tensor

from bench.decode_floor import per_layer_ms
from server.engine.attention import PagedStep, SdpaStep, Span
from server.engine.kv_cache import KVCache, KVLayout, stage_block_tables
from server.engine.paged_prefill import QUERY_TILE, prefill_tiles
from server.engine.transfers import StepUpload

GRID = {"query_tile": (16, 32, 64), "key_tile": (32, 64, 128), "num_warps": (4, 8)}
SMOKE_GRID = {"query_tile": (16, 32), "key_tile": (64,), "num_warps": (4,)}  # the same code, a few compiles


def prefill_chunks(prompt_len: tuple[int, int], budget: int, seed: int = 0) -> list[int]:
    """Chunk lengths of one step: prompts of uniform random length until `budget` tokens, the last cut."""
    rng, lengths = random.Random(seed), []
    while sum(lengths) < budget:
        lengths.append(min(rng.randint(*prompt_len), budget - sum(lengths)))
    return lengths


def spans_over_pool(lengths: list[int], cached: int, block_size: int) -> tuple[list[Span], int]:
    """Spans of consecutive rows over disjoint, consecutive blocks, each after `cached` tokens; and the
    blocks they take."""
    spans, row, next_block = [], 0, 0
    for length in lengths:
        blocks = -(-(cached + length) // block_size)
        spans.append(Span(row, length, cached, list(range(next_block, next_block + blocks))))
        row, next_block = row + length, next_block + blocks
    return spans, next_block


def attending(step: PagedStep | SdpaStep, queries: torch.Tensor):
    return lambda layer: step.attend(layer, queries, None, None)


def time_prefill(model, prompt_len: tuple[int, int], budget: int, cached: int, repeats: int, grid: dict = GRID) -> dict:
    """{"new": ..., "after_cached": ..., "one_long": ...}, each with both paths' ms over every layer and their
    largest difference."""
    parameter = next(model.parameters())
    config, device = model.config, parameter.device
    layout = KVLayout.from_config(config, parameter.dtype)
    lengths = prefill_chunks(prompt_len, budget)
    heads = config.num_attention_heads
    result = {}
    for case, chunks, start in (("new", lengths, 0), ("after_cached", lengths, cached), ("one_long", [budget], 0)):
        spans, blocks = spans_over_pool(chunks, start, 16)
        kv = KVCache(layout, blocks, 16, device, prefix_caching=False)
        kv.keys.normal_(), kv.values.normal_()
        queries = torch.randn(budget, heads, layout.head_dim, device=device, dtype=layout.dtype)
        upload = StepUpload(device)
        steps = {"paged": PagedStep(kv, spans, budget, upload), "sdpa": SdpaStep(kv, spans, budget, upload)}
        upload.send()
        timings = {name: per_layer_ms(kv, repeats, attending(step, queries)) for name, step in steps.items()}
        paged, sdpa = (step.attend(0, queries, None, None).float() for step in steps.values())
        result[case] = {
            "chunks": len(chunks),
            "tokens": budget,
            "cached": start,
            "paged_ms": timings["paged"],
            "sdpa_ms": timings["sdpa"],
            "max_difference": (paged - sdpa).abs().max().item(),
        }
        if device.type == "cuda":
            result[case]["launches"] = time_launches(kv, spans, queries, paged, repeats, grid)
        del kv
    return result


def time_launches(
    kv: KVCache, spans: list[Span], queries: Tensor, default: Tensor, repeats: int, grid: dict = GRID
) -> list[dict]:
    """The Triton prefill kernel over the spans under every launch of `grid`: ms over every layer and the
    largest difference from `default` (the engine's launch, layer 0), or why the launch failed."""
    from server.engine.paged_prefill_triton import PrefillLaunch

    launches = []
    for query_tile, key_tile, num_warps in itertools.product(*grid.values()):
        launch = PrefillLaunch(key_tile, num_warps)
        figures = {
            "query_tile": query_tile,
            **vars(launch),
            "default": (query_tile, launch) == (QUERY_TILE, PrefillLaunch()),
        }
        try:
            attend = launched(kv, spans, queries, query_tile, launch)
            difference = (attend(0).float() - default).abs().max().item()
            launches.append({**figures, "ms": per_layer_ms(kv, repeats, attend), "max_difference": difference})
        except Exception as e:  # a launch the compiler refuses (registers, shared memory) is a result too
            launches.append({**figures, "error": f"{type(e).__name__}: {e}"[:200]})
    return launches


def launched(kv: KVCache, spans: list[Span], queries: Tensor, query_tile: int, launch) -> Callable[[int], Tensor]:
    """layer -> the spans' prefill attention at that layer, by the Triton kernel under `launch` with tiles of
    `query_tile` tokens."""
    from server.engine.paged_prefill_triton import paged_prefill_triton

    upload = StepUpload(queries.device)
    width = max(len(s.block_table) for s in spans)
    tables = stage_block_tables(upload, [s.block_table for s in spans], width, kv.pad_block)
    tiles = upload.stage(prefill_tiles([(s.row, s.length, s.start) for s in spans], query_tile))
    upload.send()
    out, scale = torch.zeros_like(queries), queries.shape[-1] ** -0.5

    def attend(layer: int) -> Tensor:
        args = (tables, tiles, query_tile, kv.block_size, scale, None)
        return paged_prefill_triton(out, queries, kv.keys[layer], kv.values[layer], *args, launch=launch)

    return attend
