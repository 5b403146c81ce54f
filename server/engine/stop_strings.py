"""Stop strings on streamed text: cut the output before the first stop string (or after it, where asked),
and hold back a tail that could still become one, so a stream never shows text that a stop string later
removes. A stop string counts where it ends in text fed while stopping is allowed (vLLM's min_tokens
feeds the first tokens' text with stopping not yet allowed)."""

from __future__ import annotations

from collections.abc import Sequence


def held_tail(text: str, strings: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `strings`: text that may yet become one
    of them, and so is held back from a stream."""
    for size in range(min(max(map(len, strings), default=0) - 1, len(text)), 0, -1):
        tail = text[-size:]
        if any(s.startswith(tail) for s in strings):
            return size
    return 0


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...], include_in_output: bool = False):
        self.stops = stops
        self.include_in_output = include_in_output
        # the text not shown yet: a stop string ending in new text begins in it (shown text holds no stop string's
        # beginning), so the shown text is forgotten and a long output is matched in linear time
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str, may_stop: bool = True) -> str:
        """Add generated text; returns what may be shown now. Sets `stopped` on a match that ends in `delta`,
        unless `may_stop` is False."""
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        fed = len(self.pending)
        self.pending += delta
        if may_stop:
            hits = [(i, i + len(s)) for s in self.stops if (i := self.pending.find(s, max(0, fed - len(s) + 1))) >= 0]
            if hits:
                self.stopped = True
                start, end = min(hits)
                return self._show(end if self.include_in_output else start)
        return self._show(len(self.pending) - held_tail(self.pending, self.stops))

    def finish(self) -> str:
        """The request ended without a stop string: release the held-back tail."""
        return "" if self.stopped else self._show(len(self.pending))

    def _show(self, end: int) -> str:
        shown, self.pending = self.pending[:end], self.pending[end:]
        return shown
