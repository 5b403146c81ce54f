"""Which prompt positions an adapter edits, with pyreft's conventions.

Specs: "f7+l7" (first 7 and last 7 prompt tokens), "f5", "l1", or an explicit comma-separated list
of positions such as "0,1,-1" (negative positions count from the end of the prompt).

pyreft caps each side at L // 2 for a prompt of L tokens (BOS included), so short prompts get fewer
positions and a 1-token prompt gets none. With shared weights one intervention per layer covers
every position. Without, a layer has two interventions: #0 takes the first positions and #1 the
last ones when the spec has both sides; otherwise both take every position (pyreft's behaviour).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FIRST_LAST = re.compile(r"^(?:f(?P<both_f>\d+)\+l(?P<both_l>\d+)|f(?P<f>\d+)|l(?P<l>\d+))$")
_EXPLICIT = re.compile(r"^-?\d+(?:,-?\d+)*$")
MAX_POSITIONS = 4096


@dataclass(frozen=True)
class PositionSpec:
    first: int = 0
    last: int = 0
    explicit: tuple[int, ...] | None = None

    @property
    def two_sided(self) -> bool:
        return self.explicit is None and self.first > 0 and self.last > 0

    def __str__(self) -> str:
        if self.explicit is not None:
            return ",".join(map(str, self.explicit))
        return "+".join(part for part in (self.first and f"f{self.first}", self.last and f"l{self.last}") if part)


def parse_positions(text: str) -> PositionSpec:
    """Parse a position spec; raises ValueError with the accepted forms on anything else."""
    cleaned = text.replace(" ", "").lower()
    if _EXPLICIT.match(cleaned):
        positions = tuple(dict.fromkeys(int(p) for p in cleaned.split(",")))
        if len(positions) > MAX_POSITIONS:
            raise ValueError(f"at most {MAX_POSITIONS} explicit positions")
        return PositionSpec(explicit=positions)
    match = _FIRST_LAST.match(cleaned)
    if match:
        groups = {k: int(v) for k, v in match.groupdict().items() if v is not None}
        first = groups.get("both_f", groups.get("f", 0))
        last = groups.get("both_l", groups.get("l", 0))
        if first + last == 0:
            raise ValueError(f"positions {text!r} select no token")
        if max(first, last) > MAX_POSITIONS:
            raise ValueError(f"positions {text!r}: at most {MAX_POSITIONS} per side")
        return PositionSpec(first=first, last=last)
    raise ValueError(f"invalid positions {text!r}: use 'f<N>+l<M>', 'f<N>', 'l<M>' or a list like '0,1,-1'")


def first_last_positions(spec: PositionSpec, prompt_len: int) -> tuple[list[int], list[int]]:
    """The (first, last) position lists for a prompt of `prompt_len` tokens, capped at L // 2."""
    if spec.explicit is not None:
        resolved = (p if p >= 0 else prompt_len + p for p in spec.explicit)
        return sorted({p for p in resolved if 0 <= p < prompt_len}), []
    first = min(spec.first, prompt_len // 2)
    last = min(spec.last, prompt_len // 2)
    return list(range(first)), list(range(prompt_len - last, prompt_len))


def interventions_per_layer(share_weights: bool) -> int:
    return 1 if share_weights else 2


def intervention_positions(spec: PositionSpec, share_weights: bool, prompt_len: int) -> list[list[int]]:
    """Prompt positions of each intervention of a layer (index #0, #1), for a prompt of `prompt_len`."""
    first, last = first_last_positions(spec, prompt_len)
    if share_weights:
        return [first + last]
    if spec.two_sided:
        return [first, last]
    return [first + last, first + last]
