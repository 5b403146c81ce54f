"""Per-request state inside the engine: tokens, sampling parameters, adapter, KV blocks."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

import torch

from server.reft.adapter import Adapter

MAX_LOGPROBS = 20
# Bounds well inside int64 (torch's index and seed type) and beyond any real vocabulary or context.
MAX_TOP_K = 1 << 20
MAX_NEW_TOKENS = 1 << 20
MAX_TOKEN_ID = (1 << 31) - 1
MAX_SEED = (1 << 63) - 1


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens or the context window
    ABORT = "abort"  # cancelled by the client or the server
    ERROR = "error"  # this request failed; the engine goes on


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings: matched on text by the front end
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; n >= 0 = chosen token's logprob plus the top n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self) -> None:
        """Raise ValueError naming the first out-of-range parameter."""
        checks = [
            (1 <= self.max_new_tokens <= MAX_NEW_TOKENS, f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}]"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be >= 0"),
            (0 <= self.top_k <= MAX_TOP_K, f"top_k must be in [0, {MAX_TOP_K}] (0 disables it)"),
            (self.seed is None or 0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}]"),
            (all(0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids), "stop_token_ids must be valid token ids"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}]"),
            (all(s for s in self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    adapter: Adapter | None = None
    arrival: float = field(default_factory=time.monotonic)

    token_ids: list[int] = field(init=False)
    positions: list[list[int]] = field(init=False)  # edited prompt positions per intervention index
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # content keys of full blocks (prefix caching)
    num_cached_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    generator: torch.Generator | None = None  # made by the sampler on first use when seeded
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)
        self.positions = self.adapter.positions(len(self.prompt_ids)) if self.adapter is not None else []

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
