"""Content keys of full KV blocks, for prefix caching.

A block's keys and values depend on every token up to its end and on every edit made at those
positions: an edited position changes its own hidden states and, through attention, all later ones.
So block i's key chains block i-1's key with block i's token ids and the request's edits inside it
(as bytes from its ReFT edit, opaque here), and the chain starts from the edit's identity (`base`
without one). Two sequences share a block only when their whole prefixes up to it were computed
identically: an edited prefix is never shared with an unedited one, nor with a prefix of the same
tokens edited at other positions (a longer prompt moves its last-l positions). BLAKE2b keeps
collisions out of the question.
"""

from __future__ import annotations

import hashlib
import struct

from server.engine.sequence import Sequence

BASE_ROOT = b"base"


def block_key(parent: bytes, tokens: list[int], edits: bytes) -> bytes:
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
    digest.update(edits)
    return digest.digest()


def extend_block_keys(seq: Sequence, block_size: int, num_blocks: int) -> list[bytes]:
    """seq.block_keys extended to cover its first `num_blocks` full blocks (those tokens must exist)."""
    keys = seq.block_keys
    while len(keys) < num_blocks:
        start = len(keys) * block_size
        end = start + block_size
        edits = seq.edit.block_signature(start, end) if seq.edit is not None else b""
        parent = keys[-1] if keys else (seq.edit.cache_root if seq.edit is not None else BASE_ROOT)
        keys.append(block_key(parent, seq.token_ids[start:end], edits))
    return keys
