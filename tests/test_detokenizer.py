"""Incremental detokenization: the deltas of any split of the output add up to what transformers'
own `decode` gives for the whole, through the Rust backend where that gives the same text, and
through transformers where its tokenizer cleans up spaces after decoding."""

import random

import pytest
from transformers import AutoTokenizer

from server.engine.detokenizer import IncrementalDetokenizer, decoder_of


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def test_the_fast_backend_decodes_and_deltas_add_up(tokenizer):
    assert decoder_of(tokenizer) is tokenizer.backend_tokenizer
    rng = random.Random(0)
    for _ in range(20):
        prompt = [rng.randrange(3, 259) for _ in range(rng.randint(1, 8))]
        output = [rng.randrange(3, 259) for _ in range(rng.randint(1, 40))]  # bytes: split characters too
        detokenizer, text, i = IncrementalDetokenizer(tokenizer, prompt), "", 0
        while i < len(output):
            step = rng.randint(1, 3)
            text += detokenizer.push(output[i : i + step])
            i += step
        text += detokenizer.flush()
        whole = tokenizer.decode(prompt[-5:] + output, skip_special_tokens=True)
        assert whole.endswith(text) and text == whole[len(tokenizer.decode(prompt[-5:], skip_special_tokens=True)) :]


def test_tokenizers_that_clean_up_spaces_keep_transformers_decode(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path, clean_up_tokenization_spaces=True)
    assert decoder_of(tokenizer) is tokenizer


@pytest.mark.parametrize("clean_up_spaces", [False, True])
def test_token_texts_are_transformers_decode_of_each_token_once(tokenizer, clean_up_spaces):
    """Logprobs name tokens through TokenTexts: each id's text as transformers' `decode` gives it (special
    tokens shown), decoded once however often it is named."""
    from server.api.token_texts import TokenTexts

    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path, clean_up_tokenization_spaces=clean_up_spaces)
    vocab = range(len(tokenizer))
    expected = [tokenizer.decode([i]) for i in vocab]
    texts = TokenTexts(tokenizer)
    decoded = []
    real = texts._decoder.decode
    texts._decoder.decode = lambda ids, **kwargs: decoded.append(ids) or real(ids, **kwargs)
    assert [texts(i) for i in vocab] == expected == [texts(i) for i in vocab]
    assert len(decoded) == len(tokenizer)
