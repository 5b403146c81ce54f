"""Token selection for the rows of a step: greedy, temperature, top-k, top-p, min-p, repetition
penalty and per-request seeds, plus optional logprobs.

Sampling draws exponential noise per vocabulary entry and takes argmax(p / noise), which samples
from p exactly. A seeded request draws its noise from its own generator, so its tokens depend only
on its own seed and probabilities, not on which other requests share the step.
Logprobs are those of the raw model distribution (before penalties and temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.sequence import Sequence


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def apply_repetition_penalty(logits: Tensor, token_ids: list[int], penalty: float) -> None:
    """HF/CTRL-style, in place on one row: seen tokens' positive logits shrink, negative ones grow."""
    seen = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
    values = logits.index_select(0, seen)
    logits.index_copy_(0, seen, torch.where(values > 0, values / penalty, values * penalty))


def filter_logits(logits: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude; rows are [n, vocab], parameters [n]."""
    vocab = logits.shape[-1]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)
        k = torch.where(top_k > 0, top_k, vocab)
        drop = rank[None, :] >= k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before > top_p[:, None]  # the token that crosses top_p stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


class Sampler:
    def __call__(self, logits: Tensor, seqs: list[Sequence]) -> list[Sample]:
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if any(s.sampling.logprobs is not None for s in seqs) else None
        penalized = [i for i, s in enumerate(seqs) if s.sampling.repetition_penalty != 1.0]
        if penalized:
            logits = logits.clone()
            for i in penalized:
                apply_repetition_penalty(logits[i], seqs[i].token_ids, seqs[i].sampling.repetition_penalty)
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
        if sampled:
            tokens[sampled] = self._sample(logits[sampled], [seqs[i] for i in sampled])
        token_list = tokens.tolist()
        return [self._result(token_list[i], seq, raw_logprobs, i) for i, seq in enumerate(seqs)]

    def _sample(self, logits: Tensor, seqs: list[Sequence]) -> Tensor:
        device = logits.device
        temperature = torch.tensor([s.sampling.temperature for s in seqs], device=device)
        top_k = torch.tensor([s.sampling.top_k for s in seqs], device=device)
        top_p = torch.tensor([s.sampling.top_p for s in seqs], device=device)
        min_p = torch.tensor([s.sampling.min_p for s in seqs], device=device)
        probs = filter_logits(logits / temperature[:, None], top_k, top_p, min_p).softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i, seq in enumerate(seqs):
            if seq.sampling.seed is not None:
                if seq.generator is None:
                    seq.generator = torch.Generator(device).manual_seed(seq.sampling.seed)
                noise[i].exponential_(generator=seq.generator)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _result(token: int, seq: Sequence, raw_logprobs: Tensor | None, row: int) -> Sample:
        wanted = seq.sampling.logprobs
        if wanted is None or raw_logprobs is None:
            return Sample(token)
        row_logprobs = raw_logprobs[row]
        top = []
        if wanted > 0:
            values, ids = row_logprobs.topk(wanted)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        return Sample(token, float(row_logprobs[token]), top)
