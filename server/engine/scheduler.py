"""Iteration-level scheduling: which tokens of which sequences the next step computes.

Every step, running sequences are visited oldest first: a decoding sequence takes one token, a
prefilling one takes a chunk of its prompt from the budget left after the decodes still to come
(chunked prefill never stalls decoding). Then waiting sequences are admitted first-come first-served
while budget, sequence slots and KV blocks allow, each starting after the longest prefix the KV
cache already holds (prefix caching). One whose next prompt block a running sequence is computing
(the same tokens, edited alike: n choices of one prompt, a system prompt many requests share) waits
until that block is in the cache instead of computing it again. When the pool is full, the newest
running sequences are preempted (their blocks freed, recomputed later) so the oldest always
progress: no request starves and none fails for lack of memory.
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from dataclasses import dataclass

from server.engine.config import EngineConfig, EngineConfigError
from server.engine.kv_cache import KVCache
from server.engine.sequence import Sequence, SequenceStatus


def _by_arrival(seq: Sequence) -> float:
    return seq.arrival


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed this step
    length: int

    @property
    def prefills(self) -> bool:
        """Whether it computes prompt tokens, or recomputes generated ones (after a preemption): not a decode."""
        return self.length > 1 or self.start < self.seq.num_prompt

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the sequence's last known token, so the step samples for it."""
        return self.start + self.length == self.seq.num_tokens


class Scheduler:
    def __init__(self, kv: KVCache, config: EngineConfig):
        if config.max_batched_tokens < config.max_num_seqs:
            raise EngineConfigError(
                ("max_batched_tokens", "max_num_seqs"),
                f"{config.max_batched_tokens} tokens a step are fewer than {config.max_num_seqs} sequences: every "
                "running sequence decodes a token each step",
            )
        self.kv = kv
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished, cancelled or failed sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)

    def schedule(self) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        budget = self.config.max_batched_tokens
        decodes_left = sum(1 for s in self.running if s.num_uncomputed == 1 and not s.ending)
        preempted = False
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.ending:
                continue  # preempted earlier in this loop, or done once its pending token is read
            if seq.num_uncomputed == 1:
                decodes_left -= 1
                length = 1
            else:
                length = min(seq.num_uncomputed, budget - decodes_left)
            if length <= 0:
                continue
            length, preempted_now = self._make_room(seq, length)
            preempted |= preempted_now
            if length == 0:
                continue
            self.kv.allocate(seq, length)
            chunks.append(ScheduledChunk(seq, seq.num_computed, length))
            budget -= length
        if not preempted:
            chunks.extend(self._admit(budget))
        return chunks

    def _make_room(self, seq: Sequence, length: int) -> tuple[int, bool]:
        """Blocks for `length` tokens of seq, preempting newer sequences; returns the length that fits."""
        preempted = False
        while self.kv.blocks_needed(seq, length) > self.kv.num_free_blocks:
            fits = self.kv.tokens_that_fit(seq, length)
            if fits > 0 and seq.num_uncomputed > 1:
                return fits, preempted  # a prefill chunk shrinks before anyone is preempted
            victim = self.running[-1]
            self._preempt(victim)
            preempted = True
            if victim is seq:
                return 0, preempted
        return length, preempted

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)  # newest preempted first, so older ones end up in front

    def _admit(self, budget: int) -> list[ScheduledChunk]:
        chunks = []
        caching = [s for s in self.running if self.kv.caches_more_of_prompt(s)]
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted with a token still in flight: its prefill waits until the host has it
            self.kv.reuse_prefix(seq)
            length = min(seq.num_uncomputed, budget)
            reserve = self.config.watermark_blocks if self.running else 0  # it spares running decodes a preemption
            twin = self.kv.next_block_in_the_making(seq, caching)
            if twin or self.kv.blocks_needed(seq, length) + reserve > self.kv.num_free_blocks:
                self.kv.free(seq)  # hand back any reused blocks until it is admitted
                seq.num_computed = 0
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.kv.count_lookup(seq)
            self.kv.allocate(seq, length)
            seq.status = SequenceStatus.RUNNING
            insort(self.running, seq, key=_by_arrival)  # a re-admitted preempted sequence keeps its rank
            if self.kv.caches_more_of_prompt(seq):
                caching.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, length))
            budget -= length
        return chunks

    def complete(self, chunks: list[ScheduledChunk]) -> None:
        """Record that the step computed these chunks' K/V."""
        for chunk in chunks:
            chunk.seq.num_computed = chunk.start + chunk.length
            self.kv.cache_full_blocks(chunk.seq)
