"""The seam between the engine and ReFT: what an adapter does to one request, built once at submit.

The engine holds a `RequestEdit` without looking inside it. It asks it three things:
- `rows(...)`: which rows of a step's packed batch a chunk of the request edits (None: none), which
  it hands to ReFT's step plan (plan.py);
- `cache_root` and `block_signature(...)`: the prefix cache's identity of the request's edits, so that
  K/V computed under an edit are shared only with requests edited the same way (engine/prefix_keys.py);
- `name`: the adapter's name, for metrics.

Which positions an adapter edits (the first f and last l prompt tokens today) is decided here and
nowhere else: a new edit rule (editing some decode positions, a steering vector) changes this module,
not the scheduler, the KV cache or the model runner.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Hashable
from dataclasses import dataclass, field

from server.reft.adapter import Adapter
from server.reft.plan import EditedRows


@dataclass(frozen=True, eq=False)
class RequestEdit:
    adapter: Adapter
    positions: tuple[tuple[int, ...], ...]  # edited token positions of intervention #k of every layer
    # every edited position, sorted: a range of positions without one (most of a long prompt's blocks, every decode
    # chunk) is found in O(log n)
    edited: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "edited", tuple(sorted({p for positions in self.positions for p in positions})))

    @classmethod
    def for_prompt(cls, adapter: Adapter, prompt_len: int) -> RequestEdit:
        return cls(adapter, tuple(tuple(p) for p in adapter.positions(prompt_len)))

    @property
    def name(self) -> str:
        return self.adapter.name

    @property
    def cache_root(self) -> bytes:
        """Where the request's prefix-cache key chain starts: the adapter's content digest, so a
        reloaded adapter reuses its cached prefixes and a new version never does."""
        return f"adapter {self.adapter.digest}".encode()

    def _offsets(self, start: int, end: int) -> list[list[int]]:
        """Per intervention index, the edited positions inside [start, end), counted from `start`."""
        return [[p - start for p in positions if start <= p < end] for positions in self.positions]

    def _edits_in(self, start: int, end: int) -> bool:
        """Whether any position in [start, end) is edited."""
        first = bisect.bisect_left(self.edited, start)
        return first < len(self.edited) and self.edited[first] < end

    def block_signature(self, start: int, end: int) -> bytes:
        """The edits inside token positions [start, end), as bytes for the block's cache key (none: empty)."""
        if not self._edits_in(start, end):
            return b""
        offsets = self._offsets(start, end)
        return b"".join(struct.pack(f"<2q{len(o)}q", index, len(o), *o) for index, o in enumerate(offsets))

    def rows(self, owner: Hashable, first_row: int, start: int, length: int) -> EditedRows | None:
        """The step rows to edit when tokens [start, start + length) sit at rows [first_row, ...)."""
        if not self._edits_in(start, start + length):
            return None
        rows = tuple(tuple(first_row + o for o in offsets) for offsets in self._offsets(start, start + length))
        return EditedRows(owner, self.adapter, rows, first_row, length) if any(rows) else None


def request_edit(adapter: Adapter | None, prompt_len: int) -> RequestEdit | None:
    return RequestEdit.for_prompt(adapter, prompt_len) if adapter is not None else None
