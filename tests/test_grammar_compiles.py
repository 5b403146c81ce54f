"""A request's grammar is compiled by its route, over the model's tokenizer, before the request reaches the
engine: those compiles are bounded as the requests in flight are, an engine in the same process finds each
done, and a compile that failed for want of resources is not kept."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from tests.api_utils import running_app


class HeldCompiles:
    """`grammars._compile` counted (per grammar, and how many at once) and held until released."""

    def __init__(self, grammars):
        self.grammars, self.original = grammars, grammars._compile
        self.release, self.lock = threading.Event(), threading.Lock()
        self.calls: Counter = Counter()
        self.running = self.most = 0
        grammars._compile = self._held

    def _held(self, grammar):
        with self.lock:
            self.calls[grammar] += 1
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.release.wait(60)
            return self.original(grammar)
        finally:
            with self.lock:
                self.running -= 1

    def restore(self):
        self.release.set()
        self.grammars._compile = self.original


def post_at_once(client, bodies):
    answers: list = [None] * len(bodies)

    def post(i):
        answers[i] = client.post("/v1/generate", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    return threads, answers


def distinct_grammars(count):
    return [
        {"prompt": "n:", "max_new_tokens": 4, "structured_outputs": {"regex": f"[0-9]{{3}}-{i}"}} for i in range(count)
    ]


def poll(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_more_distinct_grammars_in_flight_than_are_kept_are_each_compiled_once(tiny_model_dir, tmp_path):
    """With the engine in a thread, the route's compile is the one the engine then finds done, also with more
    distinct grammars awaited at once than the 8 a Grammars keeps (each request holds its compile: evicted from
    the 8, the engine compiled them again, 21 compiles of 12 grammars)."""
    count = 12
    with running_app(tiny_model_dir("llama"), tmp_path, engine_core="thread", device="cpu") as client:
        held = HeldCompiles(client.app.state.reft.grammars)
        try:
            threads, answers = post_at_once(client, distinct_grammars(count))
            poll(lambda: len(held.calls) == count, 10)
            held.release.set()
            for thread in threads:
                thread.join(120)
        finally:
            held.restore()
        assert all(a is not None and a.status_code == 200 for a in answers), [a and a.text for a in answers]
        compiles = sorted(held.calls.values())
        assert compiles == [1] * count, f"{sum(compiles)} compiles of {count} grammars: {compiles}"


@pytest.mark.parametrize("engine_core", ["thread", "process"])
def test_admission_bounds_the_grammar_compiles_under_way(tiny_model_dir, tmp_path, engine_core):
    """A compile holds a thread (512 MiB of stack reserved; ~50 MiB of heap for a 250 KB schema over a 49k
    vocabulary): a request whose grammar compiles counts as in flight, and one past the bound is a 429 before
    any work (without, 24 compiles ran at once where 2 requests may be in flight)."""
    count = 24
    overrides = dict(engine_core=engine_core, device="cpu", max_num_seqs=1, max_queue=1)
    with running_app(tiny_model_dir("llama"), tmp_path, **overrides) as client:
        in_flight = client.app.state.reft.engine.max_in_flight
        held = HeldCompiles(client.app.state.reft.grammars)
        try:
            threads, answers = post_at_once(client, distinct_grammars(count))
            # until the compiles outnumber the requests admitted, or those refused have their answers
            poll(lambda: held.most > in_flight or sum(a is not None for a in answers) >= count - in_flight, 10)
            most = held.most
            held.release.set()
            for thread in threads:
                thread.join(120)
        finally:
            held.restore()
        statuses = Counter(a.status_code for a in answers)
        assert most <= in_flight, f"{most} compiles at once; {in_flight} requests may be in flight; {statuses}"


def test_a_compile_that_failed_for_want_of_memory_is_not_kept(tiny_model_dir):
    """A grammar's own fault (ValueError) is kept with the rest; a failure of the machine's is forgotten, so
    the grammar's next request compiles it again instead of failing as well."""
    from transformers import AutoTokenizer

    from server.engine.grammar import Grammars
    from server.models.tiny import VOCAB_SIZE
    from tests.test_structured_output import EOS, GRAMMARS

    grammars = Grammars(AutoTokenizer.from_pretrained(tiny_model_dir("llama")), VOCAB_SIZE, {EOS})
    compile_grammar, failures = grammars._compile, iter([MemoryError("out of memory")])

    def compile_once_short_of_memory(grammar):
        if (failure := next(failures, None)) is not None:
            raise failure
        return compile_grammar(grammar)

    grammars._compile = compile_once_short_of_memory
    failed = grammars.compile(GRAMMARS["regex"])
    assert isinstance(failed.exception(30), MemoryError)
    poll(lambda: grammars.compile(GRAMMARS["regex"]) is not failed, 10)
    assert grammars.compile(GRAMMARS["regex"]).result(30) is not None
    broken = '{"grammars": [{"lark_grammar": "start: missing_rule"}]}'
    with pytest.raises(ValueError):
        grammars.compile(broken).result(30)
    assert grammars.compile(broken) is grammars.compile(broken)
