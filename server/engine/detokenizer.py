"""Incremental detokenization: text deltas that never split a multi-byte character.

Each push decodes a short window of tokens twice (up to the last emitted token, and up to the newest)
and emits the difference once it no longer ends in an incomplete character. A few prompt tokens
seed the window so tokenizers that drop a leading space decode the first output tokens correctly.

A fast (Rust) tokenizer is asked directly, not through transformers' `decode`, whose Python wrapper costs
ten times the decode itself; this runs on the event loop for every token of every stream. Tokenizers
that clean up spaces after decoding keep transformers' path, which does that.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5


def decoder_of(tokenizer):
    """What decodes token ids for `tokenizer`: its Rust backend where that gives the same text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer
    return backend


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.decoder = decoder_of(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self.tokens = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def _decode(self, tokens: list[int]) -> str:
        return self.decoder.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: list[int]) -> str:
        self.tokens.extend(token_ids)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """At the end of a request: whatever is still held back, incomplete characters included."""
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full[len(prefix) :]
