"""Content keys of full KV blocks, for prefix caching.

A block's keys and values depend on every token up to its end and on every edit an adapter made at
those positions: an edited position changes its own hidden states and, through attention, all later
ones. So block i's key chains block i-1's key with block i's token ids and the positions inside it
that each intervention edits, and the chain starts from the adapter's identity (its content digest: a
reloaded adapter continues its chain, a new version with new weights starts another). Two sequences
share a block only when their whole prefixes up to it were computed identically: an edited prefix is
never shared with an unedited one, nor with a prefix of the same tokens edited at other positions (a
longer prompt moves its last-l positions). BLAKE2b keeps collisions out of the question.
"""

from __future__ import annotations

import hashlib
import struct

from server.engine.sequence import Sequence


def chain_root(seq: Sequence) -> bytes:
    if seq.adapter is None:
        return b"base"
    return f"adapter {seq.adapter.digest}".encode()


def block_key(parent: bytes, tokens: list[int], edits: list[list[int]]) -> bytes:
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
    for index, offsets in enumerate(edits):
        digest.update(struct.pack(f"<2q{len(offsets)}q", index, len(offsets), *offsets))
    return digest.digest()


def extend_block_keys(seq: Sequence, block_size: int, num_blocks: int) -> list[bytes]:
    """seq.block_keys extended to cover its first `num_blocks` full blocks (those tokens must exist)."""
    keys = seq.block_keys
    while len(keys) < num_blocks:
        start = len(keys) * block_size
        end = start + block_size
        edits = [[p - start for p in positions if start <= p < end] for positions in seq.positions]
        keys.append(block_key(keys[-1] if keys else chain_root(seq), seq.token_ids[start:end], edits))
    return keys
