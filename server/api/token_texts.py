"""Each token's text on its own, for logprobs, which name every token they report and its alternatives:
a scored prompt of thousands of tokens with twenty alternatives each is a hundred thousand names, built
on the event loop. Each id is decoded once for the server's life (at most a vocabulary of strings), by
the tokenizer's Rust backend where it decodes alike (engine/detokenizer.py), special tokens shown."""

from __future__ import annotations

from server.engine.detokenizer import decoder_of


class TokenTexts:
    def __init__(self, tokenizer):
        self._decoder = decoder_of(tokenizer)
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._decoder.decode([token_id], skip_special_tokens=False)
        return text
