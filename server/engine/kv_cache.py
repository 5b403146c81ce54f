"""The engine's KV cache: a preallocated pool of fixed-size blocks and a block allocator.

Every layer's keys and values live in one tensor each, [num_blocks * block_size, kv_heads,
head_dim] per layer, addressed by flat slot = block * block_size + offset. A sequence owns a block
table (list of block ids); token position p lives in slot table[p // block_size] * block_size +
p % block_size. Blocks return to the free list when a sequence finishes, is cancelled, fails or is
preempted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.sequence import Sequence


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

    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


class KVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int, device: torch.device | str = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (layout.num_layers, num_blocks * block_size, layout.num_kv_heads, layout.head_dim)
        # written zeros, not lazily mapped ones: padded gathers read unused slots, which must hold
        # finite values, and touching every page now keeps page faults out of serving latency
        self.keys = torch.empty(shape, dtype=layout.dtype, device=device).fill_(0)
        self.values = torch.empty(shape, dtype=layout.dtype, device=device).fill_(0)
        self._free = list(range(num_blocks - 1, -1, -1))

    @classmethod
    def from_budget(cls, layout: KVLayout, budget_bytes: int, block_size: int, device="cpu") -> KVCache:
        num_blocks = budget_bytes // (layout.bytes_per_token() * block_size)
        return cls(layout, num_blocks, block_size, device)

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
            seq.block_table.append(self._free.pop())
        return True

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []

    def block_keys(self, layer: int) -> torch.Tensor:
        """A layer's keys as [num_blocks, block_size, kv_heads, head_dim] (a view)."""
        return self.keys[layer].view(self.num_blocks, self.block_size, *self.keys.shape[2:])

    def block_values(self, layer: int) -> torch.Tensor:
        return self.values[layer].view(self.num_blocks, self.block_size, *self.values.shape[2:])

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store this step's keys/values [tokens, kv_heads, head_dim] at their slots."""
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)
