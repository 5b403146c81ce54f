"""The engine's KV cache: a preallocated pool of fixed-size blocks, a block allocator and the
prefix cache.

Every layer's keys and values live in one tensor each, [num_blocks * block_size, kv_heads,
head_dim] per layer, addressed by flat slot = block * block_size + offset. A sequence has a block
table (list of block ids); token position p lives in slot table[p // block_size] * block_size +
p % block_size. Blocks return to the free list when a sequence finishes, is cancelled, fails or is
preempted.

Attention must never see another sequence's data: a NaN there poisons the output even where it is
masked (0 * NaN). So the pool has one more block than it hands out, `pad_block`, always zero, for
attention paths that pad block tables; and a block is zeroed when it is handed out (the model
runner clears a step's new blocks, one op per step before the forward, on every rank of a
tensor-parallel group), so the unwritten tail of a sequence's last block holds zeros, not what its
previous owner left there.

Prefix caching: a full block, once computed, is indexed by its content key (prefix_keys.py). A new
sequence whose leading blocks have known keys takes those blocks (reference counted, never written
again: they are full) and skips their prefill. A block whose last user is gone stays indexed on the
free list, least recently freed first, until the allocator hands it out for new content.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from server.engine.config import EngineConfigError
from server.engine.prefix_keys import extend_block_keys
from server.engine.sequence import Sequence
from server.engine.transfers import StepUpload


def stage_block_tables(upload: StepUpload, tables: list[list[int]], width: int, pad: int) -> Tensor:
    """Block tables cut or padded with `pad` to `width` entries each, staged as one [tables, width] tensor."""
    host, staged = upload.reserve((len(tables), width))
    host.fill(pad)
    for row, table in zip(host, tables, strict=True):
        entries = table[:width]
        row[: len(entries)] = entries
    return staged


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_config(cls, config, dtype: torch.dtype) -> KVLayout:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype)

    def sharded(self, tensor_parallel: int) -> KVLayout:
        """The layout one rank of a tensor-parallel group caches: its own share of the KV heads."""
        if self.num_kv_heads % tensor_parallel:
            raise ValueError(f"{self.num_kv_heads} KV heads cannot be split evenly over {tensor_parallel} ranks")
        return replace(self, num_kv_heads=self.num_kv_heads // tensor_parallel)

    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


class KVCache:
    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
        prefix_caching: bool = True,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pad_block = num_blocks
        shape = (layout.num_layers, (num_blocks + 1) * block_size, layout.num_kv_heads, layout.head_dim)
        # written zeros, not lazily mapped ones: touching every page now keeps page faults out of serving latency
        self.keys = torch.empty(shape, dtype=layout.dtype, device=device).fill_(0)
        self.values = torch.empty(shape, dtype=layout.dtype, device=device).fill_(0)
        self._handed_out: list[int] = []  # blocks allocated since the last take_new_blocks()
        self.prefix_caching = prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self._refs = [0] * num_blocks
        self._block_of_key: dict[bytes, int] = {}
        self._key_of_block: dict[int, bytes] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens whose K/V were reused

    @classmethod
    def from_budget(cls, layout: KVLayout, budget_bytes: int, block_size: int, device="cpu", **options) -> KVCache:
        block_bytes = layout.bytes_per_token() * block_size
        num_blocks = budget_bytes // block_bytes - 1  # the pad block counts too
        if num_blocks < 1:
            raise EngineConfigError(
                ("kv_cache_bytes",),
                f"{budget_bytes} bytes hold no block of the KV cache: one of {block_size} tokens takes {block_bytes} "
                "bytes, and the cache keeps one more for padding",
            )
        return cls(layout, num_blocks, block_size, device, **options)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that `num_tokens` more tokens of `seq` have slots."""
        total = -(-(seq.num_computed + num_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def tokens_that_fit(self, seq: Sequence, wanted: int) -> int:
        """How many of `wanted` next tokens fit in the blocks seq has plus the free ones."""
        room = (len(seq.block_table) + self.num_free_blocks) * self.block_size - seq.num_computed
        return max(0, min(wanted, room))

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            block, _ = self._free.popitem(last=False)
            if (key := self._key_of_block.pop(block, None)) is not None:
                del self._block_of_key[key]  # its old content is overwritten now
            self._handed_out.append(block)
            self._refs[block] = 1
            seq.block_table.append(block)
        return True

    def take_new_blocks(self) -> list[int]:
        """The blocks handed out since the last call: the next forward must clear them first."""
        blocks, self._handed_out = self._handed_out, []
        return blocks

    def zero_blocks(self, blocks: Tensor) -> None:
        """Clear blocks (a long tensor of block ids on the pool's device) in every layer, one op per tensor."""
        if not blocks.numel():
            return
        for pool in (self.keys, self.values):
            pool.view(pool.shape[0], self.num_blocks + 1, -1).index_fill_(1, blocks, 0)

    def zero_pad_block(self) -> None:
        """Clear the pad block in every layer, after padding rows of a step wrote their keys and values there."""
        pad = slice(self.pad_block * self.block_size, (self.pad_block + 1) * self.block_size)
        self.keys[:, pad].zero_()
        self.values[:, pad].zero_()

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # a prefix's tail is evicted before its head
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
        seq.block_table = []
        seq.num_cached_blocks = 0

    # -- prefix caching ------------------------------------------------------------------------------
    def reuse_prefix(self, seq: Sequence) -> None:
        """Give a sequence with nothing computed the cached blocks of its longest known prefix (of its
        `_reusable_blocks`) and mark their tokens computed."""
        if seq.num_computed or seq.block_table:
            return
        reusable = self._reusable_blocks(seq)
        # the sequence may know more keys than that: a twin's `next_block_in_the_making` looked ahead
        for key in extend_block_keys(seq, self.block_size, reusable)[:reusable]:
            block = self._block_of_key.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            seq.block_table.append(block)
        seq.num_cached_blocks = len(seq.block_table)
        seq.num_computed = len(seq.block_table) * self.block_size

    def caches_more_of_prompt(self, seq: Sequence) -> bool:
        """Whether full blocks of the sequence's prompt are still to enter the prefix cache."""
        return self.prefix_caching and seq.num_cached_blocks < seq.num_prompt // self.block_size

    def next_block_in_the_making(self, seq: Sequence, caching: list[Sequence]) -> bool:
        """Whether one of `caching` (sequences that `caches_more_of_prompt`) is computing the next block that
        a sequence fresh from `reuse_prefix` would take from the prefix cache, were it there: the same key,
        not yet in the cache. The sequence then does better to wait for it than to compute it too. Only
        while that one computes its prompt, or until the step that finished it is read (its edits checked):
        an edit rule that also edits decode positions keeps its blocks unchecked for as long as it runs."""
        block = len(seq.block_table)
        if not caching or block >= self._reusable_blocks(seq):
            return False
        key = extend_block_keys(seq, self.block_size, block + 1)[block]
        return any(
            other.num_cached_blocks <= block < other.num_prompt // self.block_size
            and other.num_computed <= other.num_prompt
            and extend_block_keys(other, self.block_size, block + 1)[block] == key
            for other in caching
        )

    def _reusable_blocks(self, seq: Sequence) -> int:
        """How many leading full blocks a sequence may take from the cache: not the one holding its last token
        (the step computing that token samples the next), nor, for a request scoring its prompt
        (prompt_logprobs.py), one holding a position whose logits it still needs."""
        if not self.prefix_caching:
            return 0
        blocks = (len(seq.token_ids) - 1) // self.block_size
        if seq.sampling.prompt_logprobs is not None and seq.num_prompt_scored < seq.num_prompt - 1:
            blocks = min(blocks, seq.num_prompt_scored // self.block_size)  # position p scores token p + 1
        return blocks

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks replaying one workload start each run cold)."""
        self._block_of_key.clear()
        self._key_of_block.clear()

    def count_lookup(self, seq: Sequence) -> None:
        """Count an admitted sequence's prompt in the hit-rate figures."""
        if self.prefix_caching:
            self.prefix_queries += seq.num_prompt
            self.prefix_hits += min(seq.num_computed, seq.num_prompt)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Index the blocks that the sequence's computed tokens have filled since the last call (those
        whose every token the host knows: a pending one has no key yet). Not while an adapter edit of the
        sequence awaits its check: its K/V may be poisoned."""
        if not self.prefix_caching or seq.unchecked_edits:
            return
        full = min(seq.num_computed, len(seq.token_ids)) // self.block_size
        if full <= seq.num_cached_blocks:
            return
        keys = extend_block_keys(seq, self.block_size, full)
        for index in range(seq.num_cached_blocks, full):
            block, key = seq.block_table[index], keys[index]
            if key not in self._block_of_key:  # else another sequence computed the same block first
                self._block_of_key[key] = block
                self._key_of_block[block] = key
        seq.num_cached_blocks = full

    def block_keys(self, layer: int) -> torch.Tensor:
        """A layer's keys as [num_blocks + 1, block_size, kv_heads, head_dim] (a view; the last is pad_block)."""
        return self.keys[layer].view(self.num_blocks + 1, self.block_size, *self.keys.shape[2:])

    def block_values(self, layer: int) -> torch.Tensor:
        return self.values[layer].view(self.num_blocks + 1, self.block_size, *self.values.shape[2:])

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store this step's keys/values [tokens, kv_heads, head_dim] at their slots."""
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)
