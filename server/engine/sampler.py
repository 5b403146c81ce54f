"""Token selection for the rows of a step: greedy, temperature, top-k, top-p, min-p, logit bias,
repetition, frequency and presence penalties, min_tokens, grammars (structured outputs, grammar.py) and
per-request seeds, plus optional logprobs.

Sampling draws exponential noise per vocabulary entry and takes argmax(p / noise), which samples
from p exactly. A seeded request draws each token's noise from a generator seeded with its seed and
that token's position (`draw_seed`), so its tokens depend only on its seed and probabilities: not on
which other requests share the step, nor on a draw that failed and was retried row by row.
Logprobs are those of the raw model distribution (before penalties and temperature). The penalties
read token counts that stay on the device between steps (penalties.py).

Drawing queues the work on the device and returns at once (`Draw`): the tokens stay on the device as
the next step's inputs while their copy travels to the host, read when the core gets to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.grammar import Grammars
from server.engine.penalties import PenaltyRows
from server.engine.sequence import Sequence
from server.engine.transfers import HostCopy, to_device

MASK_64 = (1 << 64) - 1


@dataclass(frozen=True)
class PendingTokens:
    """What the step before this one sampled, still on the device: the host has not read it yet."""

    tokens: Tensor  # [rows] on the device
    row_of: dict[Sequence, int]  # each sampling sequence's row of `tokens`


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    rank: int | None = None  # of `token`: the tokens at least as likely, itself included (vLLM's count)


def apply_logit_bias(logits: Tensor, seqs: list[Sequence]) -> Tensor:
    """OpenAI's `logit_bias`: each entry's value added to its token's logit. Entries outside the vocabulary
    are ignored (the API refuses them)."""
    vocab = logits.shape[-1]
    biased = [(row, token, value) for row, seq in enumerate(seqs) for token, value in seq.sampling.logit_bias]
    biased = [entry for entry in biased if entry[1] < vocab]
    if not biased:
        return logits
    rows, tokens, values = zip(*biased, strict=True)
    index = (to_device(rows, torch.long, logits.device), to_device(tokens, torch.long, logits.device))
    return logits.index_put(index, to_device(values, logits.dtype, logits.device), accumulate=True)


def generated(seq: Sequence) -> int:
    """Tokens the sequence has drawn so far, a pending one (async scheduling) included."""
    return seq.num_tokens - seq.num_prompt


def hold_stops(logits: Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int]) -> Tensor:
    """vLLM's `min_tokens`: EOS (unless ignored) and the stop tokens masked (to -inf) in the rows of requests
    that have drawn fewer tokens than that; but where a grammar allows nothing else (a complete grammar allows
    EOS alone), it wins, as nothing could be drawn."""
    vocab = logits.shape[-1]
    held, under_grammar = [], False
    for row, seq in enumerate(seqs):
        sampling = seq.sampling
        if sampling.min_tokens and sampling.holds_stops(generated(seq)):
            # under a grammar EOS ends the request even where EOS is ignored (core.py): held all the same
            holds_eos = not sampling.ignore_eos or seq.grammar is not None
            stops = set(sampling.stop_token_ids) | (eos_token_ids if holds_eos else set())
            held += [(row, token) for token in sorted(stops) if token < vocab]
            under_grammar |= seq.grammar is not None
    if not held:
        return logits
    rows, tokens = zip(*held, strict=True)
    index = (to_device(rows, torch.long, logits.device), to_device(tokens, torch.long, logits.device))
    # the -inf made on the device: torch.tensor(..., device=cuda) would copy it from the host and wait for the device
    holding = logits.index_put(index, logits.new_full((), float("-inf")))
    if not under_grammar:  # without a grammar, tokens other than the stops are always left
        return holding
    return torch.where(holding.isneginf().all(dim=-1, keepdim=True), logits, holding)  # on the device: no sync


def draw_seed(seed: int, position: int) -> int:
    """The seed of a seeded request's draw of the token at `position`: its noise is a function of the two
    alone, so neither a retried draw, nor a preemption, nor the async engine's pending token changes it.
    splitmix64's finalizer spreads nearby seeds and positions over all 64 bits."""
    mixed = (seed * 0x9E3779B97F4A7C15 + position) & MASK_64
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & MASK_64
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & MASK_64
    return mixed ^ (mixed >> 31)


def filter_logits(logits: Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude; rows are [n, vocab], one value per row each.
    The parameters come as host lists so that deciding what to compute needs no device sync."""
    vocab, device = logits.shape[-1], logits.device
    if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)
        k = to_device([min(k, vocab) if k > 0 else vocab for k in top_k], torch.long, device)
        drop = rank[None, :] >= k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # the token that crosses top_p stays; rows without top-p keep everything (float32's cumsum can pass 1)
        mass = to_device([p if p < 1 else math.inf for p in top_p], probs.dtype, device)
        drop |= mass_before > mass[:, None]
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if any(m > 0 for m in min_p):
        probs = logits.softmax(dim=-1)
        floor = to_device(min_p, probs.dtype, device)[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def _plain_greedy(seq: Sequence) -> bool:
    sampling = seq.sampling
    plain = sampling.greedy and not sampling.penalized and not sampling.logit_bias and sampling.logprobs is None
    plain = plain and seq.grammar is None
    # min_tokens first: counting the tokens of every row of every step costs as much as the checks above
    return plain and not (sampling.min_tokens and sampling.holds_stops(generated(seq)))


@dataclass
class Draw:
    """One step's sampled tokens: on the device, where the next step can take them as inputs, and on
    their way to the host, with their logprobs where asked."""

    tokens: Tensor  # [rows] on the device
    _host: HostCopy  # the tokens, or with logprobs the table `logprob_table` describes
    _wanted: list[int | None]  # each row's number of top logprobs (None: no logprobs)

    @property
    def waited(self) -> float:
        """Seconds `samples` blocked for the device."""
        return self._host.waited

    def landed(self) -> bool:
        """Whether `samples` would return without waiting for the device."""
        return self._host.landed()

    def samples(self) -> list[Sample]:
        """The rows' samples; waits for the copy to land."""
        host = self._host.wait()
        if all(wanted is None for wanted in self._wanted):
            return [Sample(token) for token in host.tolist()]
        return read_logprob_table(host, self._wanted)


def logprob_table(tokens: Tensor, raw_logprobs: Tensor, top: int) -> Tensor:
    """What the host needs of rows with logprobs, in one tensor so that one copy brings it: per row
    [token, its logprob, its rank, `top` values..., their ids...] (float64 holds the ids exactly)."""
    chosen = raw_logprobs.gather(1, tokens[:, None])
    rank = (raw_logprobs >= chosen).sum(dim=1, keepdim=True)  # as vLLM counts it: a tie ranks the token lower
    columns = [tokens[:, None].double(), chosen.double(), rank.double()]
    if top:
        values, ids = raw_logprobs.topk(top, dim=-1)
        columns += [values.double(), ids.double()]
    return torch.cat(columns, dim=1)


def read_logprob_table(host: Tensor, wanted: list[int | None]) -> list[Sample]:
    """The samples of a `logprob_table` on the host, each with its row's `wanted` top entries; rows whose
    `wanted` is None get the token alone."""
    top = (host.shape[1] - 3) // 2
    samples = []
    for row, count in zip(host.tolist(), wanted, strict=True):
        token = int(row[0])
        if count is None:
            samples.append(Sample(token))
            continue
        values, ids = row[3 : 3 + count], row[3 + top : 3 + top + count]
        samples.append(Sample(token, row[1], [(int(i), v) for i, v in zip(ids, values, strict=True)], int(row[2])))
    return samples


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int] = frozenset(), grammars: Grammars | None = None):
        self.eos_token_ids = frozenset(eos_token_ids)  # held back, with the stop tokens, by min_tokens
        self.grammars = grammars  # the masks of rows held to a grammar (structured outputs)
        self.penalties = PenaltyRows()
        self._generators: dict[torch.device, torch.Generator] = {}  # reseeded for every seeded row's draw

    def __call__(self, logits: Tensor, seqs: list[Sequence], pending: PendingTokens | None = None) -> Draw:
        """Draw a token per row; `pending`: the tokens the previous step drew that the host has not read
        (penalty rows built now count them). The penalties count every drawn token from the next draw on:
        the caller appends each to its sequence, or ends the sequence."""
        wanted = [s.sampling.logprobs for s in seqs]
        if all(_plain_greedy(s) for s in seqs):  # the common case needs no float32 copy of the logits
            tokens = logits.argmax(dim=-1)
            return Draw(tokens, HostCopy(tokens), wanted)
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if any(w is not None for w in wanted) else None
        if self.grammars is not None:  # what a grammar forbids is out before anything weighs the rest
            logits = self.grammars.constrain(logits, [seq.grammar for seq in seqs])
        # as vLLM orders them: the bias, then the penalties, repetition's before OpenAI's
        logits = hold_stops(apply_logit_bias(logits, seqs), seqs, self.eos_token_ids)
        logits, penalized = self.penalties.apply(logits, seqs, pending)
        sampled = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
        if len(sampled) == len(seqs):  # every row samples (the chat routes' default): no argmax, no row gather
            tokens = self._sample(logits, seqs)
        else:
            tokens = logits.argmax(dim=-1)
            if sampled:
                rows = to_device(sampled, torch.long, logits.device)
                tokens.index_copy_(0, rows, self._sample(logits[rows], [seqs[i] for i in sampled]))
        if raw_logprobs is not None:
            host = HostCopy(logprob_table(tokens, raw_logprobs, max(w or 0 for w in wanted)))
        else:
            host = HostCopy(tokens)
        if penalized is not None:  # last: a draw that raised before here is drawn again row by row
            self.penalties.count(penalized, tokens)
        return Draw(tokens, host, wanted)

    def _sample(self, logits: Tensor, seqs: list[Sequence]) -> Tensor:
        device = logits.device
        params = [s.sampling for s in seqs]
        temperature = to_device([p.temperature for p in params], logits.dtype, device)
        top_k, top_p, min_p = [p.top_k for p in params], [p.top_p for p in params], [p.min_p for p in params]
        probs = filter_logits(logits / temperature[:, None], top_k, top_p, min_p).softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i, seq in enumerate(seqs):
            if seq.sampling.seed is not None:  # the launch takes the seed by value: one generator serves all rows
                generator = self._seeded(device).manual_seed(draw_seed(seq.sampling.seed, seq.num_tokens))
                noise[i].exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)

    def _seeded(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device)
        return self._generators[device]
