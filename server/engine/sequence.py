"""Per-request state inside the engine: tokens, sampling parameters, KV blocks, and the request's
ReFT edit, which the engine holds without looking inside (server/reft/request_edit.py)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.engine.sampling_params import SamplingParams
from server.reft.request_edit import RequestEdit

if TYPE_CHECKING:
    from llguidance import LLMatcher

    from server.engine.sampler import Sample


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens or the context window
    ABORT = "abort"  # cancelled by the client or the server
    ERROR = "error"  # this request failed; the engine goes on


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    edit: RequestEdit | None = None  # None: the base model
    arrival: float = field(default_factory=time.monotonic)

    token_ids: list[int] = field(init=False)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_pending: int = 0  # tokens sampled on the device that the host has not read yet (async scheduling)
    ending: bool = False  # its pending token is its last (by length): nothing more to schedule
    unchecked_edits: int = 0  # launched steps whose ReFT edits of it are not yet checked finite (EditCheck)
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # content keys of full blocks (prefix caching)
    num_cached_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_preemptions: int = 0
    num_prompt_scored: int = 0  # prompt tokens after the first whose logprobs a launched step computes
    prompt_logprobs: list[Sample] = field(default_factory=list)  # those read so far (prompt_logprobs.py)
    grammar: LLMatcher | None = None  # where `sampling.grammar` holds its tokens: its matcher (grammar.py)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens so far, the pending one included."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
