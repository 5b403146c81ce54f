"""Stop strings on streamed text: cut the output before the first stop string, and hold back a tail
that could still become one, so a stream never shows text that a stop string later removes."""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add generated text; returns what may be shown now. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        search_from = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit_until(min(hits))
        return self._emit_until(len(self.text) - self._held_back())

    def finish(self) -> str:
        """The request ended without a stop string: release the held-back tail."""
        return "" if self.stopped else self._emit_until(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        for size in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0

    def _emit_until(self, end: int) -> str:
        end = max(end, self.emitted)
        shown, self.emitted = self.text[self.emitted : end], end
        return shown
