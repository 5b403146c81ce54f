"""Load the frozen base model for the engine: device and dtype choice, our attention, eval mode."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.adapters.format import DTYPES
from server.engine.attention import ATTENTION_NAME


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA device (is the CUDA build of torch installed?)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def load_model(path: str, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) with the engine's paged attention; weights frozen."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTENTION_NAME)
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer
