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


def apply_repetition_penalties(logits: Tensor, seqs: list[Sequence]) -> Tensor:
    """HF/CTRL-style: each row's seen tokens get positive logits divided and negative ones multiplied by
    its penalty. One gather and one scatter for all rows."""
    rows, tokens, penalties = [], [], []
    for row, seq in enumerate(seqs):
        penalty = seq.sampling.repetition_penalty
        if penalty != 1.0:
            seen = sorted(set(seq.token_ids))
            rows += [row] * len(seen)
            tokens += seen
            penalties += [penalty] * len(seen)
    if not rows:
        return logits
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(tokens, device=device))
    penalty = torch.tensor(penalties, device=device)
    values = logits[index]
    logits = logits.clone()
    logits[index] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def filter_logits(logits: Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude; rows are [n, vocab], one value per row each.
    The parameters come as host lists so that deciding what to compute needs no device sync."""
    vocab, device = logits.shape[-1], logits.device
    if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=device)
        drop = rank[None, :] >= k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before > torch.tensor(top_p, device=device)[:, None]  # the token that crosses top_p stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if any(m > 0 for m in min_p):
        probs = logits.softmax(dim=-1)
        floor = torch.tensor(min_p, device=device)[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def _plain_greedy(seq: Sequence) -> bool:
    sampling = seq.sampling
    return sampling.greedy and sampling.repetition_penalty == 1.0 and sampling.logprobs is None


class Sampler:
    def __call__(self, logits: Tensor, seqs: list[Sequence]) -> list[Sample]:
        if all(_plain_greedy(s) for s in seqs):  # the common case needs no float32 copy of the logits
            return self._to_host(logits.argmax(dim=-1), None, seqs)
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if any(s.sampling.logprobs is not None for s in seqs) else None
        logits = apply_repetition_penalties(logits, seqs)
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
        if sampled:
            tokens[sampled] = self._sample(logits[sampled], [seqs[i] for i in sampled])
        return self._to_host(tokens, raw_logprobs, seqs)

    def _sample(self, logits: Tensor, seqs: list[Sequence]) -> Tensor:
        device = logits.device
        params = [s.sampling for s in seqs]
        temperature = torch.tensor([p.temperature for p in params], device=device)
        top_k, top_p, min_p = [p.top_k for p in params], [p.top_p for p in params], [p.min_p for p in params]
        probs = filter_logits(logits / temperature[:, None], top_k, top_p, min_p).softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i, seq in enumerate(seqs):
            if seq.sampling.seed is not None:
                if seq.generator is None:
                    seq.generator = torch.Generator(device).manual_seed(seq.sampling.seed)
                noise[i].exponential_(generator=seq.generator)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _to_host(tokens: Tensor, raw_logprobs: Tensor | None, seqs: list[Sequence]) -> list[Sample]:
        """One device-to-host copy for the whole step: the tokens, and with logprobs a table of
        [token, its logprob, top values..., top ids...] per row (float64 holds the ids exactly)."""
        if raw_logprobs is None:
            return [Sample(token) for token in tokens.tolist()]
        top = max(s.sampling.logprobs or 0 for s in seqs)
        columns = [tokens[:, None].double(), raw_logprobs.gather(1, tokens[:, None]).double()]
        if top:
            values, ids = raw_logprobs.topk(top, dim=-1)
            columns += [values.double(), ids.double()]
        samples = []
        for row, seq in zip(torch.cat(columns, dim=1).tolist(), seqs, strict=True):
            token, wanted = int(row[0]), seq.sampling.logprobs
            if wanted is None:
                samples.append(Sample(token))
                continue
            values, ids = row[2 : 2 + wanted], row[2 + top : 2 + top + wanted]
            samples.append(Sample(token, row[1], [(int(i), v) for i, v in zip(ids, values, strict=True)]))
        return samples
