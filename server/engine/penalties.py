"""Repetition, frequency and presence penalties from token counts kept on the device.

Every penalized sequence owns a row of two device tables as wide as the vocabulary: how many times it
generated each token (`counts`) and which tokens its prompt holds (`prompt`). A row is built from the
sequence's token list once, when it first samples; from then on each draw adds its token to the row on
the device (`PenaltyRows.count`), so a step costs O(penalized rows) of host work however long the outputs
grow. Before, each step rebuilt every row's tokens from its list: O(tokens so far) per row per step.

A token drawn but not read by the host yet (async scheduling) is in its row already, as it must be.
Whoever draws must therefore append each drawn token to its sequence or end the sequence.

Rows go to the sequences of the current step: a free row (its sequence finished and was let go) first,
else the least recently used row of a sequence outside the step (preempted: it is rebuilt if it comes
back); the tables grow only when the rows the step leaves idle cannot hold its new sequences (whose
free rows then go first). So they hold fewer than twice the rows of the largest step: at most
2 x max_num_seqs x vocab x 5 bytes (389 MB for 256 sequences and a 152k vocabulary), half again while
growing. They live outside the KV cache's budget, in the headroom that --gpu-memory-utilization
leaves, and only once a request asks for a penalty.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.sequence import Sequence
from server.engine.transfers import StepUpload, to_device


@dataclass(frozen=True)
class Penalized:
    """The rows of a step that penalties apply to, to count their drawn tokens once drawn."""

    rows: Tensor  # [P] rows of the step's logits
    slots: Tensor  # [P] their rows of the tables


class PenaltyRows:
    def __init__(self):
        self._counts: Tensor | None = None  # [capacity, vocab] float32: tokens generated, as logits add them
        self._prompt: Tensor | None = None  # [capacity, vocab] bool: tokens of the prompt
        # weakly: a finished request (and through its edit its adapter) must not live on in a table row
        self._owners: list[weakref.ref[Sequence] | None] = []
        self._slot_of: weakref.WeakKeyDictionary[Sequence, int] = weakref.WeakKeyDictionary()
        self._last_step: list[int] = []  # the step that last used each table row
        self._step = 0
        self.rebuilds = 0  # rows built from a token list: once per penalized sequence, again if its row was taken

    @property
    def capacity(self) -> int:
        return len(self._owners)

    def apply(self, logits: Tensor, seqs: list[Sequence], pending=None) -> tuple[Tensor, Penalized | None]:
        """The logits [rows, vocab] (float32) with each row's repetition, frequency and presence penalties,
        and the penalized rows, to `count` once drawn. `pending`: the PendingTokens of the step before,
        which rows built now must count."""
        rows = [row for row, seq in enumerate(seqs) if seq.sampling.penalized]
        if not rows:
            return logits, None
        penalized = [seqs[row] for row in rows]
        step = self._locate(rows, penalized, logits, pending)
        whole = len(rows) == len(seqs)
        values = self._penalize(logits if whole else logits.index_select(0, step.rows), step, penalized)
        return (values if whole else logits.index_copy(0, step.rows, values)), step

    def count(self, step: Penalized, tokens: Tensor) -> None:
        """Add the tokens drawn for the step's rows [rows] to their sequences' counts, on the device."""
        self._add(step.slots, tokens.index_select(0, step.rows))

    def _locate(self, rows: list[int], seqs: list[Sequence], logits: Tensor, pending) -> Penalized:
        """The rows and their table rows on the device, the tables built for sequences new to them; the
        integers travel in one copy."""
        built: list[tuple[int, Sequence]] = []  # rows handed out now, with their sequences: to build
        try:
            slots = self._assign(seqs, logits, built)
            pairs = self._rebuild_pairs(built, pending)
            upload = StepUpload(logits.device, capacity=2 * len(rows) + len(built) + 2 * sum(map(len, pairs)))
            located = upload.stage([rows, slots])
            rebuild = self._stage_rebuild(built, pairs, upload, pending) if built else None
            upload.send()
            if rebuild is not None:
                rebuild()
        except BaseException:  # rows handed out but not built must not be read as built
            for slot, seq in built:
                self._owners[slot] = None
                self._slot_of.pop(seq, None)
            raise
        return Penalized(located[0], located[1])

    def _penalize(self, values: Tensor, step: Penalized, seqs: list[Sequence]) -> Tensor:
        """`values` [P, vocab]: the penalized rows' logits. Repetition's division or product, then frequency
        and presence subtracted together, `v - (count * frequency + [count > 0] * presence)`."""
        params = [
            [s.sampling.repetition_penalty, s.sampling.frequency_penalty, s.sampling.presence_penalty] for s in seqs
        ]
        repetition, frequency, presence = to_device(params, values.dtype, values.device).T[:, :, None]
        counts = self._counts.index_select(0, step.slots)
        generated = counts > 0
        if any(s.sampling.repetition_penalty != 1.0 for s in seqs):
            seen = generated | self._prompt.index_select(0, step.slots)
            values = torch.where(seen, torch.where(values > 0, values / repetition, values * repetition), values)
        if any(s.sampling.frequency_penalty or s.sampling.presence_penalty for s in seqs):
            values = values - (counts * frequency + generated * presence)
        return values

    def _assign(self, seqs: list[Sequence], logits: Tensor, built: list[tuple[int, Sequence]]) -> list[int]:
        """Each sequence's table row; the rows handed out now go into `built` as they are, with their
        sequences, so that a failure part-way (growing the tables) can hand them back."""
        self._step += 1
        for seq in seqs:  # first mark the rows the step keeps, so that handing out rows never takes one
            if (slot := self._slot_of.get(seq)) is not None:
                self._last_step[slot] = self._step
        new = [seq for seq in seqs if seq not in self._slot_of]
        if new:
            idle = self._idle_rows()
            if len(idle) < len(new):
                self._grow(max(2 * self.capacity, len(seqs)), logits)
                idle = self._idle_rows()
            for seq, slot in zip(new, idle[: len(new)], strict=True):
                self._hand_out(slot, seq)
                built.append((slot, seq))
        return [self._slot_of[seq] for seq in seqs]

    def _idle_rows(self) -> list[int]:
        """The rows the step does not use, in the order they are handed out: free rows first, then the least
        recently used."""
        idle = [slot for slot in range(self.capacity) if self._last_step[slot] < self._step]
        return sorted(idle, key=lambda slot: (self._owner(slot) is not None, self._last_step[slot]))

    def _hand_out(self, slot: int, seq: Sequence) -> None:
        if (owner := self._owner(slot)) is not None:
            del self._slot_of[owner]
        self._owners[slot], self._slot_of[seq], self._last_step[slot] = weakref.ref(seq), slot, self._step

    def _owner(self, slot: int) -> Sequence | None:
        """The live sequence the row serves, if any."""
        owner = self._owners[slot]
        return owner() if owner is not None else None

    def _grow(self, capacity: int, logits: Tensor) -> None:
        counts = logits.new_zeros((capacity, logits.shape[-1]), dtype=torch.float32)
        prompt = torch.zeros((capacity, logits.shape[-1]), dtype=torch.bool, device=logits.device)
        if self._counts is not None:
            counts[: self.capacity] = self._counts
            prompt[: self.capacity] = self._prompt
        self._counts, self._prompt = counts, prompt
        added = capacity - self.capacity
        self._owners += [None] * added
        self._last_step += [0] * added

    def _rebuild_pairs(self, built: list[tuple[int, Sequence]], pending) -> tuple[list, list, list]:
        """For the rows handed out: (row, token) of their prompts' tokens and of their generated ones, and
        (row, PendingTokens row) of the tokens they drew that the host has not read yet."""
        vocab = self._counts.shape[-1] if built else 0
        prompt = [(slot, t) for slot, seq in built for t in set(seq.prompt_ids) if t < vocab]
        generated = [(slot, t) for slot, seq in built for t in seq.generated_ids if t < vocab]
        waiting = [(slot, pending.row_of[seq]) for slot, seq in built if seq.num_pending]
        return prompt, generated, waiting

    def _stage_rebuild(self, built: list[tuple[int, Sequence]], pairs: tuple, upload: StepUpload, pending):
        """Stage what rebuilding the handed-out rows needs; returns what rebuilds them once sent."""
        slots = upload.stage([slot for slot, _ in built])
        prompt, generated, waiting = (upload.stage(p) if p else None for p in pairs)

        def rebuild() -> None:
            self.rebuilds += len(built)
            self._counts.index_fill_(0, slots, 0.0)
            self._prompt.index_fill_(0, slots, False)
            if prompt is not None:
                self._prompt.index_put_((prompt[:, 0], prompt[:, 1]), torch.ones_like(prompt[:, 0], dtype=torch.bool))
            if generated is not None:
                self._add(generated[:, 0], generated[:, 1])
            if waiting is not None:
                self._add(waiting[:, 0], pending.tokens.index_select(0, waiting[:, 1]))

        return rebuild

    def _add(self, slots: Tensor, tokens: Tensor) -> None:
        """One more of each token in its slot's counts."""
        self._counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=self._counts.dtype), accumulate=True)
