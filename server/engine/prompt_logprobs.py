"""Prompt logprobs (vLLM's `prompt_logprobs`; OpenAI's `echo` with `logprobs`): every prompt token after the
first scored by the model given the tokens before it, with the top n alternatives, as the raw model
distribution gives them (as sampled tokens' logprobs are).

A step that computes prompt tokens of such a request keeps the logits of those rows too: the row at
position p scores prompt token p + 1 (`ScoredRows`, laid out by the runner's `pack`). They are reduced on
the device to one table per step (`PromptScores`), which travels to the host with the step's sampled
tokens and is read with them. Each prompt token is scored once: `Sequence.num_prompt_scored` counts them
as their steps launch, so a preempted request's recompute scores nothing twice. Such a request takes from
the prefix cache only blocks whose positions it has scored (kv_cache.reuse_prefix): a cached position
has no logits. A step may score every prompt token of its budget: the warm-up step that sizes the KV pool
on a GPU (memory.py) scores its whole prompt, so that the pool leaves room for those logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.sampler import Sample, logprob_table, read_logprob_table
from server.engine.sequence import Sequence
from server.engine.transfers import HostCopy, to_device

SCORE_ROWS = 256  # rows reduced at once: bounds the float32 copy of the logits that log_softmax makes


@dataclass(frozen=True)
class ScoredRows:
    """Prompt tokens `first` .. `first + count - 1` of `seq`, scored by consecutive logits rows."""

    seq: Sequence
    first: int
    count: int

    @property
    def targets(self) -> list[int]:
        return self.seq.prompt_ids[self.first : self.first + self.count]


def rows_to_score(seq: Sequence, start: int, length: int) -> ScoredRows | None:
    """The prompt tokens a chunk of positions `start` .. `start + length - 1` scores that no step scored yet."""
    if seq.sampling.prompt_logprobs is None:
        return None
    first = max(start, seq.num_prompt_scored) + 1
    last = min(start + length, seq.num_prompt - 1)  # the prompt's last position scores the first generated token
    return ScoredRows(seq, first, last - first + 1) if last >= first else None


class PromptScores:
    """One step's prompt logprobs, on their way to the host."""

    def __init__(self, logits: Tensor, scored: list[ScoredRows]):
        """`logits`: one row per scored token, in the order of `scored`. Queues the work on the device."""
        self.scored = scored
        self._wanted = [s.seq.sampling.prompt_logprobs for s in scored for _ in range(s.count)]
        targets = to_device([t for s in scored for t in s.targets], torch.long, logits.device)
        top = max(self._wanted)
        tables = [
            logprob_table(targets[i : i + SCORE_ROWS], logits[i : i + SCORE_ROWS].float().log_softmax(dim=-1), top)
            for i in range(0, len(targets), SCORE_ROWS)
        ]
        self._host = HostCopy(torch.cat(tables))

    @property
    def waited(self) -> float:
        return self._host.waited

    def landed(self) -> bool:
        return self._host.landed()

    def read(self) -> list[tuple[Sequence, list[Sample]]]:
        """Each scored range's samples (token = the prompt token scored); waits for the copy to land."""
        samples = read_logprob_table(self._host.wait(), self._wanted)
        ranges, begin = [], 0
        for scored in self.scored:
            ranges.append((scored.seq, samples[begin : begin + scored.count]))
            begin += scored.count
        return ranges
