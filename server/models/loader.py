"""Load the frozen base model for the engine: device and dtype choice, our attention, eval mode,
and, across a tensor-parallel group, transformers' own tensor-parallel plan for the model.

`load_causal_lm` is the one place a model gets its attention implementation: the engine's paged
attention (registered with transformers here, explicitly) or another, such as "sdpa" for references.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DistributedConfig, PretrainedConfig

from server.adapters.dtypes import DTYPES
from server.adapters.fingerprint import model_fingerprint
from server.engine.attention import ATTENTION_NAME, register_paged_attention
from server.model_load_errors import loading


def resolve_device(name: str) -> torch.device:
    """The device `name` (a Settings.device) stands for; ValueError, saying why, where it is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(_why_no_cuda())
    return torch.device(name)


def _why_no_cuda() -> str:
    if not torch.backends.cuda.is_built():
        return f"torch here has no CUDA (torch {torch.__version__}): install a CUDA build of torch"
    return f"torch {torch.__version__} sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them)"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def check_tensor_parallel(config, size: int) -> None:
    """Refuse a degree that transformers' plan cannot shard into whole attention and KV heads per rank."""
    if not getattr(config, "base_model_tp_plan", None):
        raise ValueError(f"transformers has no tensor-parallel plan for {config.model_type} models: serve it with 1")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % size or kv_heads % size:
        raise ValueError(
            f"tensor parallel degree {size} must divide the model's {heads} attention heads and {kv_heads} KV "
            f"heads, so that every rank owns whole KV heads; use a degree that divides {kv_heads} and add replicas"
        )


def load_model(path: str, device: torch.device, dtype: torch.dtype, tensor_parallel: int = 1):
    """(model, tokenizer) with the engine's paged attention; weights frozen. With `tensor_parallel` > 1,
    every rank of the (already joined) process group calls this and holds its own shard. Files that
    cannot be loaded raise ModelLoadError."""
    with loading(path):  # first: the tokenizer reads config.json too, and would be blamed for it
        config = AutoConfig.from_pretrained(path)
    with loading(path, "its tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path)
    options = {}
    if tensor_parallel > 1:
        check_tensor_parallel(config, tensor_parallel)
        options["distributed_config"] = DistributedConfig(tp_size=tensor_parallel)
    model = load_causal_lm(path, dtype, **options)
    model.to(device).requires_grad_(False)
    if tensor_parallel > 1:
        model_fingerprint(model)  # on every rank: sampling sharded weights gathers them from the group
    return model, tokenizer


def load_causal_lm(
    source: str | Path | PretrainedConfig, dtype: torch.dtype, attention: str = ATTENTION_NAME, **options
):
    """A causal LM in eval mode whose attention is `attention` (default: the engine's paged attention),
    from a checkpoint directory or hub id, or random-init from a config; `options` go to transformers."""
    register_paged_attention()
    if isinstance(source, PretrainedConfig):
        model = AutoModelForCausalLM.from_config(source, dtype=dtype, attn_implementation=attention, **options)
    else:
        with loading(str(source)):
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attention, **options)
    return model.eval()
