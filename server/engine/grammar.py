"""Structured outputs: a request's tokens held to a grammar (vLLM's structured outputs, OpenAI's
`response_format`), with llguidance, the Rust matcher that vLLM, llama.cpp and OpenAI's own structured
outputs use.

The front end turns a JSON schema, a regular expression, a list of choices or a Lark grammar into one
llguidance grammar (`SamplingParams.grammar`, text). The engine gives each such request a matcher over the
model's tokenizer: compiled off the engine's thread, which steps the other requests meanwhile (the request
joins the scheduler once it has), and kept for the requests that bring it again. Before a step draws, the
matchers of its constrained rows write their masks of allowed tokens into one bitmask on the host, in
parallel and without the GIL (llguidance's executor); it crosses to the device in one copy and sets the
rest of those rows' logits to -inf, before the bias, the penalties and the temperature (logprobs stay the
model's own). Each drawn token then advances its matcher (`advance`). Once the grammar is complete, its
mask allows EOS alone, which ends the request with "stop" as any EOS does (here even where the request
ignores EOS), so the text is the grammar's and the last token, as in vLLM, the EOS left out of it. A mask
needs the token before it: with async scheduling, a step with constrained rows is read before the next one
is launched (core.py).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

from server.engine.transfers import to_device

if TYPE_CHECKING:
    import llguidance

log = logging.getLogger(__name__)

BITS = 32  # tokens per word of a bitmask

# llguidance compiles a grammar recursively, with no depth limit of its own: a frame or more per level of nesting
# (a chain of $refs in a JSON schema, of rules in a Lark grammar). A thread's usual 8 MiB hold about 1000 levels,
# which well under 100 KB of request body reach, and a stack overflow kills the process: the server or its engine. So a
# grammar's text is bounded, and it is compiled on a thread whose stack holds the deepest grammar of that size
# (measured: at most ~128 MiB, for Lark rules nested one per ~9 characters; JSON schemas need less), with margin.
# The stack is reserved, not committed: a compile uses only the pages its depth touches.
MAX_GRAMMAR_CHARS = 1 << 18
COMPILE_STACK_BYTES = 1 << 29
_stack_size = threading.Lock()  # threading.stack_size is process-wide: set for one thread's start at a time
COMPILED_KEPT = 8  # grammars whose compiled matcher (its lexer, its parser's tables) a Grammars keeps

UNAVAILABLE = "structured outputs are not available: the tokenizer is not one llguidance reads"

T = TypeVar("T")


class GrammarBroken(ValueError):
    """A drawn token the matcher refused: a bug, since the mask allowed it."""


class GrammarFailed(ValueError):
    """The matcher gave up on the request's grammar while computing its mask: one no text completes (`start:
    start`, a JSON schema that is its own $ref), or one past a limit of llguidance's. Its mask then allows EOS
    alone, which would end the request with "stop" and text the grammar does not match."""


class Grammars:
    """A model's tokenizer as llguidance sees it, and the matchers made over it."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int]):
        """`tokenizer`: a fast transformers tokenizer; `vocab_size`: the logits' width (it may pass the
        tokenizer's vocabulary); the EOS ids end a complete grammar."""
        import llguidance.hf  # only where structured outputs are served: the engine runs without it
        import llguidance.torch

        eos = sorted(eos_token_ids) or None
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self._executor = llguidance.LLExecutor()
        self._new_matcher = llguidance.LLMatcher
        self._fill = llguidance.torch.fill_next_token_bitmask_par
        self.vocab_size = vocab_size
        # the latest grammars compiled (or compiling), as fresh matchers that requests get copies of: a compile
        # takes a while (0.2 s for a 100 KB schema, more with a real vocabulary), and n choices of one request,
        # or the requests of one client, bring the same grammar again and again
        self._compiled: OrderedDict[str, Future[llguidance.LLMatcher]] = OrderedDict()
        # and every compile that someone still holds, kept or not: a request the route checked holds its compile
        # until the engine has it, which then finds it done however many other grammars came meanwhile
        self._held: weakref.WeakValueDictionary[str, Future[llguidance.LLMatcher]] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()  # the routes check requests' grammars here as the engine compiles them

    def compile(self, grammar: str) -> Future[llguidance.LLMatcher]:
        """`grammar` (llguidance's grammar text) compiled off the caller's thread, whose work goes on (the
        compile releases the GIL); the future holds a fresh matcher to copy (`Future.result().deep_copy()`),
        or the ValueError saying why it does not compile. Any thread may call it."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is None:
                compiled = self._held.get(grammar)
            started = compiled is None
            if started:
                compiled = self._held[grammar] = on_compile_stack(lambda: self._compile(grammar))
            self._compiled[grammar] = compiled
            self._compiled.move_to_end(grammar)
            if len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        if started:  # outside the lock: a compile already done runs the callback here, at once
            compiled.add_done_callback(lambda done: self._forget_if_broken(grammar, done))
        return compiled

    def _forget_if_broken(self, grammar: str, done: Future) -> None:
        """A compile that failed other than by the grammar's fault (out of memory, say) is not kept: the
        grammar's next request compiles it again."""
        error = done.exception()
        if error is None or isinstance(error, ValueError):
            return
        with self._lock:
            if self._compiled.get(grammar) is done:
                del self._compiled[grammar]
            if self._held.get(grammar) is done:
                del self._held[grammar]

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher of `grammar`, once compiled; ValueError if it does not compile."""
        return self.compile(grammar).result().deep_copy()

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        bounded(grammar)
        matcher = self._new_matcher(self._tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(f"structured output: {matcher.get_error()}")
        return matcher

    def constrain(self, logits: Tensor, matchers: Sequence[llguidance.LLMatcher | None]) -> Tensor:
        """`logits` [rows, vocab] (float32) with what each row's matcher forbids at -inf; rows without one
        as they are."""
        rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
        if not rows:
            return logits
        words = -(-self.vocab_size // BITS)
        host = torch.empty(len(rows), words, dtype=torch.int32, pin_memory=logits.is_cuda)
        self._fill(self._executor, [(matchers[row], i) for i, row in enumerate(rows)], host)
        allowed = _unpack(host.to(logits.device, non_blocking=True), logits.shape[-1])
        if len(rows) == len(matchers):
            return logits.masked_fill(~allowed, float("-inf"))
        index = to_device(rows, torch.long, logits.device)  # queued behind the forward: torch.tensor would wait for it
        return logits.index_copy(0, index, logits.index_select(0, index).masked_fill(~allowed, float("-inf")))


def bounded(grammar: str) -> None:
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise ValueError(
            f"structured output: the grammar is {len(grammar)} characters, more than the {MAX_GRAMMAR_CHARS} served"
        )


def on_compile_stack(build: Callable[[], T]) -> Future[T]:
    """`build()` (llguidance compiling a grammar) started on a thread of its own with COMPILE_STACK_BYTES of
    stack; the future of what it returns or raises."""
    outcome: Future[T] = Future()
    outcome.set_running_or_notify_cancel()  # a compile others share: one caller giving up must not cancel it

    def run() -> None:
        try:
            outcome.set_result(build())
        except BaseException as e:  # raised again where the future is read
            outcome.set_exception(e)

    with _stack_size:
        usual = threading.stack_size(COMPILE_STACK_BYTES)
        try:
            threading.Thread(target=run, name="grammar-compile", daemon=True).start()
        finally:
            threading.stack_size(usual)
    return outcome


def _unpack(bitmask: Tensor, vocab: int) -> Tensor:
    """[rows, words] int32 bitmask (bit b of word w: token 32w + b) -> [rows, vocab] bool."""
    shifts = torch.arange(BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1
    allowed = bits.flatten(1).bool()
    if allowed.shape[1] < vocab:  # logits wider than the grammar's vocabulary: the rest is never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    return allowed[:, :vocab]


def advance(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Feed a drawn token to its matcher; whether the grammar is now complete (no token may follow)."""
    if matcher.is_error():  # since the mask the token was drawn under
        raise GrammarFailed(f"structured output: {matcher.get_error().splitlines()[0]}")
    if not matcher.consume_token(token):
        raise GrammarBroken(f"structured output: token {token} breaks the grammar: {matcher.get_error()}")
    return matcher.is_stopped()


def grammars_for(tokenizer, vocab_size: int, eos_token_ids: Iterable[int]) -> Grammars | None:
    """Structured outputs for a served model, or None where llguidance cannot read its tokenizer (a slow,
    Python-only one) or is not installed: requests that ask for them are then refused."""
    try:
        return Grammars(tokenizer, vocab_size, eos_token_ids)
    except Exception as e:
        log.warning("structured outputs are off: llguidance cannot read this tokenizer (%s)", e)
        return None
