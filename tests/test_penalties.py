"""Logit bias and the repetition, frequency and presence penalties against their plain reading, one logit
at a time, and the device-side counts behind the penalties: built once per sequence, kept up to date
by the draws, rebuilt when a row was taken, and bounded."""

import gc
import weakref

import pytest
import torch

from server.engine.penalties import PenaltyRows
from server.engine.sampler import PendingTokens, Sampler, apply_logit_bias
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from tests.conftest import load_reference_model
from tests.engine_utils import load_engine_model, make_core, prompt, run_core, seq


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_engine_model(tiny_model_dir("llama"))


def openai_adjusted(logits: torch.Tensor, seqs: list[Sequence], pending: dict[int, int]) -> torch.Tensor:
    """The plain reading of logit_bias, repetition, frequency and presence penalties, one logit at a time,
    in vLLM's order; `pending`: row -> a generated token the sequence's list does not hold yet."""
    out = logits.clone()
    for row, sequence in enumerate(seqs):
        p = sequence.sampling
        generated = sequence.generated_ids + ([pending[row]] if row in pending else [])
        seen = set(sequence.token_ids) | set(generated)
        for token in range(out.shape[1]):
            value = out[row, token].item() + dict(p.logit_bias).get(token, 0.0)
            if token in seen:
                value = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
            count = generated.count(token)
            out[row, token] = value - p.frequency_penalty * count - p.presence_penalty * (count > 0)
    return out


def adjusted(rows: PenaltyRows, logits: torch.Tensor, seqs: list[Sequence], pending=None) -> torch.Tensor:
    return rows.apply(apply_logit_bias(logits, seqs), seqs, pending)[0]


def test_logit_bias_and_penalties_match_their_plain_reading():
    torch.manual_seed(0)
    vocab = 40
    params = [
        SamplingParams(logit_bias=((3, 5.0), (39, -7.5), (1000, 9.0))),  # 1000: outside, ignored
        SamplingParams(frequency_penalty=0.7),
        SamplingParams(presence_penalty=-1.2, frequency_penalty=-0.4, repetition_penalty=1.3),
        SamplingParams(),
        SamplingParams(presence_penalty=1.5, logit_bias=((7, 1.0),)),
    ]
    seqs = []
    for row, sampling in enumerate(params):
        seq_ = Sequence(f"r{row}", [1, 2, 3, 7], sampling)
        seq_.token_ids += [7, 7, 9, 1 + row, 9, 7]  # generated: repeats, and a token of the prompt
        seqs.append(seq_)
    pending = {1: 9, 4: 30}  # rows whose last token is still on the device
    for row in pending:
        seqs[row].num_pending = 1
    tokens = torch.tensor([pending[1], 0, pending[4]])
    device_pending = PendingTokens(tokens, {seqs[1]: 0, seqs[4]: 2})
    logits = torch.randn(len(seqs), vocab) * 3
    result = adjusted(PenaltyRows(), logits, seqs, device_pending)
    torch.testing.assert_close(result, openai_adjusted(logits, seqs, pending), atol=1e-5, rtol=0)
    assert torch.equal(result[3], logits[3]), "a row that asks for nothing is left alone"


def test_counts_follow_the_draws_and_survive_evictions():
    """Steps over changing sets of sequences: each draw's tokens count from the next step on, a sequence
    that comes back after its row went to another is rebuilt from its tokens, and the tables stay at
    twice the largest step."""
    torch.manual_seed(1)
    vocab = 30
    penalties = [
        SamplingParams(repetition_penalty=1.4, temperature=1.0, seed=1),
        SamplingParams(frequency_penalty=0.9, temperature=1.0, seed=2),
        SamplingParams(presence_penalty=1.1, repetition_penalty=0.8, temperature=1.0, seed=3),
        SamplingParams(temperature=1.0, seed=4),  # no penalty: never takes a row
    ]
    seqs = [Sequence(f"s{i}", [i, i + 5, i + 5], penalties[i % 4]) for i in range(8)]
    sampler = Sampler()
    steps = [seqs[:4], seqs[4:], seqs[::2], seqs[:4], seqs[1::2], seqs]
    for step in steps:
        logits = torch.randn(len(step), vocab) * 2
        expected = openai_adjusted(logits, step, {})
        torch.testing.assert_close(adjusted(sampler.penalties, logits, step), expected, atol=1e-5, rtol=0)
        for s, sample in zip(step, sampler(logits, step).samples(), strict=True):
            s.token_ids.append(sample.token)
    penalized = sum(s.sampling.penalized for s in seqs)
    assert sampler.penalties.capacity <= 2 * penalized
    assert sampler.penalties.rebuilds > penalized, "the steps above take rows from sequences that come back"


def test_a_row_whose_build_failed_is_built_again():
    """A step that fails while building a row it took from another sequence leaves no half-built row."""
    vocab = 20
    first = Sequence("first", [3, 4], SamplingParams(repetition_penalty=2.0))
    first.token_ids += [5, 5, 6]
    rows = PenaltyRows()
    logits = torch.randn(1, vocab)
    rows.apply(logits, [first])
    second = Sequence("second", [7], SamplingParams(frequency_penalty=1.0))
    second.token_ids += [8]
    second.num_pending = 1  # its pending token cannot be found without the step's PendingTokens
    with pytest.raises(AttributeError):
        rows.apply(logits, [second])
    pending = PendingTokens(torch.tensor([9]), {second: 0})
    expected = openai_adjusted(logits, [second], {0: 9})
    torch.testing.assert_close(rows.apply(logits, [second], pending)[0], expected, atol=1e-5, rtol=0)


def test_rows_handed_out_before_a_failed_growth_are_built_again(monkeypatch):
    """Growing the tables fails (out of memory) in a step that needs more rows than are idle: no row is
    left half-built, and the next step builds what it needs."""
    params = SamplingParams(frequency_penalty=2.0, repetition_penalty=1.5)
    old = Sequence("old", [1, 2], params)
    old.token_ids += [5, 5, 5]
    rows = PenaltyRows()
    rows.apply(torch.randn(1, 16), [old])
    grow = PenaltyRows._grow

    def failing_grow(self, capacity, logits):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(PenaltyRows, "_grow", failing_grow)
    first, second = Sequence("first", [3], params), Sequence("second", [4], params)
    logits = torch.randn(2, 16) * 3
    with pytest.raises(torch.OutOfMemoryError):
        rows.apply(logits, [first, second])  # one idle row (old's) for two new sequences: the tables grow
    monkeypatch.setattr(PenaltyRows, "_grow", grow)
    torch.testing.assert_close(rows.apply(logits[:1], [first])[0], openai_adjusted(logits[:1], [first], {}))


def test_a_finished_sequence_is_let_go_and_its_row_reused_first():
    """A table row holds its sequence weakly: a finished request, and the adapter its edit holds, are
    freed, and its row goes to the next sequence before any row of a live one."""
    rows = PenaltyRows()
    params = SamplingParams(presence_penalty=1.0)
    live, done = Sequence("live", [1], params), Sequence("done", [2], params)
    rows.apply(torch.randn(2, 8), [live, done])
    rows.apply(torch.randn(1, 8), [live])  # done's row is now the least recently used
    gone = weakref.ref(done)
    del done
    gc.collect()
    assert gone() is None
    rows.apply(torch.randn(1, 8), [Sequence("next", [3], params)])
    assert rows.capacity == 2
    rebuilt = rows.rebuilds
    rows.apply(torch.randn(1, 8), [live])
    assert rows.rebuilds == rebuilt, "the live sequence kept its row"


PENALTIES = [
    dict(repetition_penalty=1.6),
    dict(frequency_penalty=1.2, presence_penalty=0.5),
    dict(presence_penalty=2.0, repetition_penalty=0.9, logit_bias=((70, 3.0),)),
]


def plain_greedy(model, sequence: Sequence) -> list[int]:
    """The sequence's greedy tokens from whole forwards and the plain reading of its penalties."""
    tokens = list(sequence.prompt_ids)
    reading = Sequence("plain", tokens[:], sequence.sampling)
    for _ in range(sequence.sampling.max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([reading.token_ids])).logits[:, -1].float()
        reading.token_ids.append(int(openai_adjusted(logits, [reading], {}).argmax()))
    return reading.generated_ids


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_penalized_requests_match_the_plain_reading_through_preemptions(model, tiny_model_dir, async_scheduling):
    """Greedy requests with penalties, served together in a cache too small for all of them: preempted
    sequences come back to rows rebuilt from their tokens (async: with the pending one on the device)."""
    core = make_core(model, num_blocks=12, max_num_seqs=4, max_model_len=64, async_scheduling=async_scheduling)
    requests = [seq(f"p{i}", prompt(10 + i, i), max_new_tokens=24, **PENALTIES[i % 3]) for i in range(5)]
    served = run_core(core, [(r, 0) for r in requests])
    assert core.scheduler.num_preemptions > 0
    reference = load_reference_model(tiny_model_dir("llama"))
    for request in requests:
        assert served[request.request_id] == plain_greedy(reference, request), request.request_id


def test_an_engine_builds_each_row_once(model):
    """However long penalized requests run, their counts come from their token lists once: each later
    step's host work does not grow with the output."""
    core = make_core(model, async_scheduling=True)
    requests = [seq(f"p{i}", prompt(12, i), max_new_tokens=40, **PENALTIES[i % 3]) for i in range(6)]
    run_core(core, [(r, i) for i, r in enumerate(requests)] + [(seq("base", prompt(9, 9), max_new_tokens=30), 0)])
    assert core.sampler.penalties.rebuilds == len(requests)


def test_a_step_that_outgrows_the_idle_rows_grows_before_taking_any():
    """New sequences that the idle rows cannot all hold get the grown tables' free rows first, so the rows of
    sequences outside the step (preempted, coming back) are taken only as far as needed."""
    rows = PenaltyRows()
    params = SamplingParams(presence_penalty=1.0)
    a, b = Sequence("a", [1], params), Sequence("b", [2], params)
    rows.apply(torch.randn(2, 8), [a, b])
    newcomers = [Sequence(name, [3], params) for name in "cde"]
    rows.apply(torch.randn(3, 8), newcomers)
    assert rows.capacity == 4 and rows.rebuilds == 5
    rows.apply(torch.randn(1, 8), [b])
    assert rows.rebuilds == 5, "b kept its row: only one of a's and b's rows was needed"
