"""Small random-init causal LMs with a byte-level tokenizer, built offline.

The tests and benchmarks run on these, and the offline toy demo serves one. Nothing is downloaded: the tokenizer is
made with the `tokenizers` library (ids 0/1/2 = pad/bos/eos, then the 256 byte symbols), the model
from a config, and both are written with `save_pretrained` so they load back with the Auto classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (no merges): every string round-trips exactly."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: len(SPECIAL_TOKENS) + i for i, symbol in enumerate(sorted(alphabet))})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(family: str, *, hidden_size: int = 128, num_layers: int = 4, max_positions: int = 1024, **overrides):
    """A config of `family` with a few hundred thousand to a few million parameters."""
    if family == "gpt2":
        fields = dict(n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=max_positions)
    else:
        fields = dict(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 3,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
        )
    fields.update(
        vocab_size=VOCAB_SIZE,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,  # peaked logits: greedy argmax is robust to rounding differences
    )
    fields.update(overrides)
    return AutoConfig.for_model(family, **fields)


def build_tiny_model(family: str, directory: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """Write a random-init model of `family` and the byte-level tokenizer to `directory`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    directory = Path(directory)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_overrides), dtype=torch.float32)
    model.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return directory
